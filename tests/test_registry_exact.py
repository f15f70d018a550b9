"""Each registered algorithm, through bond/algorithms.py with its own sampling plan, on a finite support.

A tabular world: B prompts, K responses each (the response id is the one token of a sample), a
softmax policy π_θ over them (θ: [B, K] logits), fixed reference and anchor policies and distinct
rewards. The registered loss is summed exactly over every draw of its planned samples, each draw
weighted by its probability (float64), so the expected gradient has no Monte-Carlo error and can be
compared with the gradient of the objective the loss's docstring names, to 1e-6 or better.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bond import algorithms, tabular
from bond.algorithms import LossInputs, Samples
from bond.models import preferences_from_rewards

K = 3  # responses per prompt


class World(NamedTuple):
    """Per prompt [B, K]: log π_ref, log π_anchor and the rewards."""

    ref: jax.Array
    anchor: jax.Array
    rewards: jax.Array


def world(num_prompts: int = 1, seed: int = 0, k: int = K) -> World:
    rng = np.random.default_rng(seed)
    log_softmax = lambda x: jax.nn.log_softmax(jnp.asarray(x, jnp.float64), axis=-1)
    rewards = np.stack([rng.permutation(k) + rng.uniform(0, 0.5, k) for _ in range(num_prompts)])
    return World(log_softmax(rng.normal(size=(num_prompts, k))), log_softmax(rng.normal(size=(num_prompts, k))),
                 jnp.asarray(rewards, jnp.float64))


def tabular_samples(idx: jax.Array, sampler_log_probs: jax.Array, w: World) -> Samples:
    """Samples of response ids idx [B, S] (tokens [B, S, 1] = the id), scored and with their log-probs."""
    take = lambda table: jnp.take_along_axis(table, idx, axis=1)
    tokens = idx[..., None]
    ones = jnp.ones(tokens.shape, jnp.float64)
    return Samples(tokens, ones, ones, take(w.rewards), take(sampler_log_probs), take(w.ref), take(w.anchor))


def policy_logp_of(theta: jax.Array) -> Callable[[Samples], jax.Array]:
    """log π_θ(y) [B, S] of samples, differentiable in the tabular logits θ [B, K]."""
    return lambda s: jnp.take_along_axis(jax.nn.log_softmax(theta, axis=-1), s.tokens[..., 0], axis=1)


def algo_config(**knobs) -> ml_collections.FrozenConfigDict:
    algo = algorithms.default_algo_config()
    algo.update(knobs)
    return ml_collections.FrozenConfigDict(algo)


def expected_gradient(name: str, algo, theta: jax.Array, w: World, algo_state=None) -> jax.Array:
    """E[∇θ loss] of the registered algorithm `name`, summed over every draw of its sampling plan:
    policy samples from π_θ (held fixed: the sampler does not differentiate), anchor samples from
    π_anchor, reference samples from π_ref, each prompt's i.i.d."""
    algorithm = algorithms.get_algorithm(name)
    plan = algorithm.plan(algo)
    log_pi = jax.lax.stop_gradient(jax.nn.log_softmax(theta, axis=-1))
    sets = [(s, table, count) for s, table, count in (("policy", log_pi, plan.policy), ("anchor", w.anchor, plan.anchor),
                                                      ("reference", w.ref, plan.reference)) if count]
    num_prompts = theta.shape[0]
    hp = {k: jnp.asarray(v, jnp.float64) for k, v in algo.items() if not isinstance(v, (str, bool))}

    def grad_of_draw(*groups):
        groups = iter(groups)
        drawn = {s: tabular_samples(jnp.stack([next(groups) for _ in range(num_prompts)]), table, w)
                 for s, table, _ in sets}

        def loss(t):
            inputs = LossInputs(policy_logp_of(t), drawn.get("policy"), drawn.get("anchor"), drawn.get("reference"),
                                hp, algo, jax.random.key(0), algo_state=algo_state)
            return algorithm.loss(inputs)[0]

        return jax.grad(loss)(theta)

    draws = [(jnp.exp(table[b]), count) for _, table, count in sets for b in range(num_prompts)]
    return tabular.exact_expectation(grad_of_draw, draws)


def hard_preferences(rewards: jax.Array) -> jax.Array:
    """P(y ≻ y') [B, K, K] over the whole support, from rewards (ties ½), as the registry's default."""
    return preferences_from_rewards(rewards, kind="hard")


# ---------------------------------------------------------------------------------------------
# WIND


@pytest.mark.parametrize("eta", [0.5, 2.0])
def test_registry_wind_fits_the_exact_step_from_the_iteration_anchor(eta):
    """WIND as registered (square loss, S = 2 samples of the anchor π_t): the expected gradient
    vanishes exactly at θ = log wind_step(π_t) with the config's η and β, i.e. the policy fitted
    during an iteration is the exact mirror-descent step from π_t. With another η it does not
    vanish there (η matters), nor does the self-play form's (π_t = π_θ, samples of π_θ)."""
    with jax.enable_x64(True):
        w = world(num_prompts=2)
        beta = 0.2
        algo = algo_config(num_samples=2, wind_eta=eta, wind_beta=beta, wind_variant="square")
        step = tabular.wind_step(w.anchor, w.ref, hard_preferences(w.rewards), eta=eta, beta=beta)
        np.testing.assert_allclose(expected_gradient("wind", algo, step, w), 0.0, atol=1e-12)

        other_eta = algo_config(num_samples=2, wind_eta=eta * 3, wind_beta=beta, wind_variant="square")
        assert np.max(np.abs(expected_gradient("wind", other_eta, step, w))) > 1e-3
        assert np.max(np.abs(expected_gradient("wind_self_play", algo, step, w))) > 1e-3


def test_registry_sppo_regresses_onto_the_win_rate_against_the_iterate():
    """Iterative SPPO (S = 3 samples of π_t = the anchor): the expected gradient is that of
    (1/B)·Σ_x E_{π_t}[(log π_θ − log π_t − η(W_{π_t} − ½))²], with W_{π_t}(y) = Σ_y' π_t(y')·P(y ≻ y')."""
    with jax.enable_x64(True):
        w = world(num_prompts=2)
        eta = 3.0
        algo = algo_config(num_samples=3, sppo_eta=eta)
        theta = w.anchor + jnp.asarray([[0.3, -0.2, 0.1], [0.0, 0.4, -0.1]])
        win = tabular.win_rates_against(hard_preferences(w.rewards), jnp.exp(w.anchor))

        def objective(t):
            residual = jax.nn.log_softmax(t) - w.anchor - eta * (win - 0.5)
            return jnp.mean(jnp.sum(jnp.exp(w.anchor) * residual**2, axis=-1))

        np.testing.assert_allclose(expected_gradient("sppo", algo, theta, w), jax.grad(objective)(theta), atol=1e-12)
