"""Each registered algorithm, through bond/algorithms.py with its own sampling plan, on a finite support.

A tabular world: B prompts, K responses each (the response id is the one token of a sample), a
softmax policy π_θ over them (θ: [B, K] logits), fixed reference and anchor policies and distinct
rewards. The registered loss is summed exactly over every draw of its planned samples, each draw
weighted by its probability (float64), so the expected gradient has no Monte-Carlo error and can be
compared with the gradient of the objective the loss's docstring names, to 1e-6 or better.
"""

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bond import algorithms, tabular
from bond.bon import bon_probs
from bond.losses import rejection_sft
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


@pytest.mark.parametrize("eta, beta, num_samples", [(0.5, 0.2, 2), (2.0, 0.2, 2), (1.0, 0.1, 3)])
def test_registry_wind_self_play_is_the_policy_gradient_of_the_regularized_win_rate(eta, beta, num_samples):
    """`wind_self_play` (π_t = stop_gradient(π_θ), samples of π_θ): its expected gradient is exactly
    −2η/(1 + ηβ) · ∇θ[E_π_θ W_π_t − β·KL(π_θ‖π_ref)] at π_θ = π_t, the gradient of the regularized win
    rate; η only rescales it, which Adam with clipping undoes (why it is not WIND as published)."""
    with jax.enable_x64(True):
        w = world(num_prompts=2)
        theta = jnp.asarray(np.random.default_rng(1).normal(size=(2, K)))
        algo = algo_config(num_samples=num_samples, wind_eta=eta, wind_beta=beta, wind_variant="square")
        win_rate = jnp.einsum("bij,bj->bi", hard_preferences(w.rewards), jax.nn.softmax(theta, axis=-1))

        def regularized_win_rate(t):
            log_pi = jax.nn.log_softmax(t, axis=-1)
            return jnp.sum(jnp.exp(log_pi) * (win_rate - beta * (log_pi - w.ref)))

        expected = -2 * eta / (1 + eta * beta) * jax.grad(regularized_win_rate)(theta)
        np.testing.assert_allclose(expected_gradient("wind_self_play", algo, theta, w), expected, atol=1e-12)


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


# ---------------------------------------------------------------------------------------------
# GDC++


def gdc_log_normalizers(w: World, temperature: float) -> jax.Array:
    """log Z_x = log Σ_y π_ref(y|x)·exp(r(x, y)/τ) [B] of the registry's GDC++ target."""
    return jax.nn.logsumexp(w.ref + w.rewards / temperature, axis=-1)


@pytest.mark.parametrize("log_z_hat", [None, 0.7])
def test_registry_gdcpp_with_a_running_z_follows_the_forward_kl(log_z_hat):
    """GDC++ through the registry with S = 2 samples per prompt of π_θ and the running Ẑ of the
    train state (the mean of the two prompts' Z_x, or another value): the expected gradient is
    (1/B)·Σ_x (Z_x/Ẑ)·∇KL(p_x‖π_θ), p_x ∝ π_ref·exp(r/τ). A Ẑ estimated from the same samples
    would miss it (relative error ≈ 0.7 at S = 2)."""
    from bond.losses.distribution_matching import LogZState

    with jax.enable_x64(True):
        w = world(num_prompts=2)
        tau = 0.8
        algo = algo_config(num_samples=2, target_temperature=tau)
        theta = w.ref + jnp.asarray([[0.5, -0.3, 0.2], [-0.4, 0.1, 0.6]])
        log_z = gdc_log_normalizers(w, tau)
        log_z_hat = jnp.log(jnp.mean(jnp.exp(log_z))) if log_z_hat is None else jnp.float64(log_z_hat)
        state = LogZState(log_sum=log_z_hat + jnp.log(5.0), count=jnp.float64(5.0))  # Ẑ from 5 earlier samples
        target = jnp.exp(w.ref + w.rewards / tau - log_z[:, None])

        def objective(t):
            kl = tabular.forward_kl_objective(t, target)
            return jnp.mean(jnp.exp(log_z - log_z_hat) * kl)

        np.testing.assert_allclose(expected_gradient("gdcpp", algo, theta, w, algo_state=state),
                                   jax.grad(objective)(theta), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# DPO, IPO


def tied_world() -> World:
    """One prompt, K = 3 responses, two of them with equal rewards."""
    w = world(num_prompts=1)
    return w._replace(rewards=jnp.asarray([[0.0, 1.0, 1.0]], jnp.float64))


@pytest.mark.parametrize("name", ["dpo", "ipo"])
@pytest.mark.parametrize("make_world", [world, tied_world])
def test_registry_online_pairs_follow_the_preference_loss_over_decided_pairs(name, make_world):
    """Online DPO / IPO with S = 2 samples of π_θ: chosen the better, rejected the worse. The expected
    gradient is that of Σ_{r(y) > r(y')} 2π(y)π(y')·ℓ(h(y) − h(y')) (π held at the sampler, h = log π_θ −
    log π_ref, ℓ the DPO or IPO loss): pairs of equal reward carry no preference and add nothing."""
    with jax.enable_x64(True):
        w = make_world()
        beta = 0.5
        algo = algo_config(num_samples=2, pref_beta=beta)
        theta = w.ref + jnp.asarray([[0.4, -0.5, 0.3]])
        pi = jax.lax.stop_gradient(jnp.exp(jax.nn.log_softmax(theta)))[0]
        r = w.rewards[0]
        ell = {"dpo": lambda d: -jax.nn.log_sigmoid(beta * d), "ipo": lambda d: (d - 0.5 / beta) ** 2}[name]

        def objective(t):
            h = (jax.nn.log_softmax(t) - w.ref)[0]
            pairs = 2 * pi[:, None] * pi[None, :] * (r[:, None] > r[None, :])
            return jnp.sum(pairs * ell(h[:, None] - h[None, :]))

        np.testing.assert_allclose(expected_gradient(name, algo, theta, w), jax.grad(objective)(theta), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# REINFORCE, J-BOND


def test_registry_reinforce_follows_the_kl_regularized_reward():
    """REINFORCE (RLOO, S = 3 samples of π_θ): the expected gradient is −∇(E_π[r] − β·KL(π‖π_ref)),
    averaged over the prompts."""
    with jax.enable_x64(True):
        w = world(num_prompts=2)
        beta = 0.3
        algo = algo_config(num_samples=3, kl_coef=beta)
        theta = w.ref + jnp.asarray([[0.4, -0.5, 0.3], [0.1, 0.2, -0.6]])

        def objective(t):
            log_pi = jax.nn.log_softmax(t)
            return -jnp.mean(jnp.sum(jnp.exp(log_pi) * (w.rewards - beta * (log_pi - w.ref)), axis=-1))

        np.testing.assert_allclose(expected_gradient("reinforce", algo, theta, w), jax.grad(objective)(theta),
                                   atol=1e-12)


def test_registry_j_bond_follows_its_objective_for_a_fixed_anchor():
    """J-BOND (one sample of π_θ, two of the anchor per prompt): the expected gradient is that of
    `tabular.j_bond_objective` (forward KL to Best-of-2 of the anchor, backward term with the
    J-BOND reward, γ·KL(π‖π_anchor)), averaged over the prompts."""
    with jax.enable_x64(True):
        w = world(num_prompts=2)
        beta, gamma = 0.4, 0.7
        algo = algo_config(num_samples=1, beta=beta, gamma=gamma)
        theta = w.anchor + jnp.asarray([[0.4, -0.5, 0.3], [0.1, 0.2, -0.6]])

        def objective(t):
            return jnp.mean(tabular.j_bond_objective(t, w.anchor, w.rewards, beta=beta, gamma=gamma))

        np.testing.assert_allclose(expected_gradient("j_bond", algo, theta, w), jax.grad(objective)(theta),
                                   atol=1e-12)


# ---------------------------------------------------------------------------------------------
# BOND, iterative BOND, vBoN: the log-quantile reward from k samples of the target


def expected_smoothed_log_quantile(log_probs: jax.Array, rewards: jax.Array, k: int) -> jax.Array:
    """E[log((c + 1)/(k + 1))] [B, K] for each response y, c ~ Binomial(k, p_le(y)) the number of k
    target samples whose reward is <= r(y): the expectation of `bon.smoothed_log_quantile` from k
    samples, in closed form (distinct rewards)."""
    probs = jnp.exp(log_probs)
    p_le = jnp.sum(probs[:, None, :] * (rewards[:, None, :] <= rewards[:, :, None]), axis=-1)
    counts = jnp.arange(k + 1, dtype=jnp.float64)
    choose = jnp.asarray([math.comb(k, c) for c in range(k + 1)], jnp.float64)
    binomial = choose * p_le[..., None] ** counts * (1 - p_le[..., None]) ** (k - counts)
    return jnp.sum(binomial * jnp.log((counts + 1) / (k + 1)), axis=-1)


@pytest.mark.parametrize("name", ["bond", "iterative_bond"])
def test_registry_bond_follows_the_jeffreys_objective_with_the_smoothed_quantile(name):
    """BOND (towards Best-of-N of π_ref) and iterative BOND (of the anchor), S = 2 policy samples and
    max(k, N) = 3 target samples per prompt: the expected gradient is that of
    `tabular.jeffreys_bond_objective` — (1−β)·KL(π_BoN‖π) + β·E_π[log π − log π_target −
    (N−1)·q̄] — with π_BoN the exact Best-of-N of the target and q̄(y) the expectation of the
    smoothed log-quantile from the 3 target samples. The other target's tables give another
    gradient (the test tells a wiring that read π_ref for the anchor apart)."""
    with jax.enable_x64(True):
        w = world(num_prompts=2)
        n, k, beta = 3, 2, 0.4
        algo = algo_config(n=float(n), num_ref_samples=k, num_samples=2, beta=beta)
        theta = w.ref + jnp.asarray([[0.4, -0.5, 0.3], [0.1, 0.2, -0.6]])
        samples_of_target = max(k, n)

        def objective(t, target):
            q_bar = expected_smoothed_log_quantile(target, w.rewards, samples_of_target)
            bon = bon_probs(jnp.exp(target), w.rewards, n)
            return jnp.mean(tabular.jeffreys_bond_objective(t, target, q_bar, bon, n=n, beta=beta))

        target, other = (w.ref, w.anchor) if name == "bond" else (w.anchor, w.ref)
        got = expected_gradient(name, algo, theta, w)
        np.testing.assert_allclose(got, jax.grad(objective)(theta, target), atol=1e-12)
        assert np.max(np.abs(got - jax.grad(objective)(theta, other))) > 1e-3


def test_registry_vbon_follows_the_backward_kl_with_the_smoothed_quantile():
    """vBoN (S = 2 policy samples, k = 3 reference samples): the expected gradient is that of
    KL(π‖π_ref) − (N−1)·E_π[q̄], q̄ the expected smoothed log-quantile from k reference samples."""
    with jax.enable_x64(True):
        w = world(num_prompts=2)
        n, k = 4, 3
        algo = algo_config(n=float(n), num_ref_samples=k, num_samples=2)
        theta = w.ref + jnp.asarray([[0.4, -0.5, 0.3], [0.1, 0.2, -0.6]])
        q_bar = expected_smoothed_log_quantile(w.ref, w.rewards, k)

        def objective(t):
            return jnp.mean(tabular.bond_backward_objective(t, w.ref, q_bar, n=n))

        np.testing.assert_allclose(expected_gradient("vbon", algo, theta, w), jax.grad(objective)(theta), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# RAFT, BoNBoN, sppo_hard


def test_registry_raft_fits_best_of_its_own_samples():
    """RAFT (S = 3 samples of π, SFT on the best): the expected gradient is that of
    KL(Best-of-3(π)‖π_θ), the Best-of-3 target held at the sampler's π, averaged over prompts."""
    with jax.enable_x64(True):
        w = world(num_prompts=2)
        algo = algo_config(num_samples=3)
        theta = w.ref + jnp.asarray([[0.4, -0.5, 0.3], [0.1, 0.2, -0.6]])
        target = bon_probs(jnp.exp(jax.nn.log_softmax(theta)), w.rewards, 3)

        def objective(t):
            return jnp.mean(tabular.forward_kl_objective(t, target))

        np.testing.assert_allclose(expected_gradient("raft", algo, theta, w), jax.grad(objective)(theta), atol=1e-12)


def best_worst_probs(ref_probs: jax.Array, rewards: jax.Array, n: int) -> jax.Array:
    """P(best = i, worst = j) [K, K] among n i.i.d. draws of one prompt's π_ref (distinct rewards), by
    inclusion–exclusion over the reward interval [r_j, r_i]: every draw inside it, minus those
    missing either end."""
    below_or_at = rewards[None, :] <= rewards[:, None]  # [i, y]: r(y) <= r(i)
    inside = lambda lo_open, hi_open: jnp.sum(
        ref_probs[None, None, :]
        * jnp.where(hi_open, rewards[None, None, :] < rewards[:, None, None], below_or_at[:, None, :])
        * jnp.where(lo_open, rewards[None, None, :] > rewards[None, :, None], below_or_at.T[None, :, :]),
        axis=-1,
    ) ** n
    probs = inside(False, False) - inside(True, False) - inside(False, True) + inside(True, True)
    return jnp.where(rewards[:, None] >= rewards[None, :], probs, 0.0)


def test_registry_bonbon_fits_best_of_n_and_the_best_worst_margin():
    """BoNBoN (n = 3 samples of π_ref, one prompt): the expected gradient is that of
    α·KL(π_BoN‖π_θ) + (1−α)·Σ_{i≠j} P(best = i, worst = j)·(h_i − h_j − 1/(2β))², h = log π_θ − log π_ref,
    β = bonbon_beta(n); a draw whose samples are all one response carries no pair."""
    with jax.enable_x64(True):
        w = world(num_prompts=1)
        n, alpha = 3, 0.3
        algo = algo_config(n=float(n), bonbon_alpha=alpha)
        theta = w.ref + jnp.asarray([[0.4, -0.5, 0.3]])
        ref_probs, rewards = jnp.exp(w.ref[0]), w.rewards[0]
        pairs = best_worst_probs(ref_probs, rewards, n)
        # a distribution over (best, worst), whose diagonal is the draws of one response n times
        np.testing.assert_allclose([jnp.sum(pairs), *jnp.diag(pairs)], [1.0, *ref_probs**n], atol=1e-12)
        pairs = pairs * (1 - jnp.eye(K))
        margin_target = 0.5 / rejection_sft.bonbon_beta(n)

        def objective(t):
            h = (jax.nn.log_softmax(t) - w.ref)[0]
            sft = tabular.forward_kl_objective(t, bon_probs(ref_probs, rewards, n)[None])[0]
            ipo = jnp.sum(pairs * (h[:, None] - h[None, :] - margin_target) ** 2)
            return alpha * sft + (1 - alpha) * ipo

        np.testing.assert_allclose(expected_gradient("bonbon", algo, theta, w), jax.grad(objective)(theta), atol=1e-12)


def test_registry_sppo_hard_pins_each_log_ratio_and_pulls_equal_pairs_to_the_reference():
    """sppo_hard (S = 2 samples of π): the expected gradient is that of Σ_{y,y'} π(y)π(y')·
    [(h(best) − t)² + (h(worst) + t)²], t = 1/(2·pref_beta), π held at the sampler. A draw of one
    response twice is its own best and worst: 2h² + 2t², a pull of h towards 0 (π_ref), which a tie
    mask (DPO, IPO) would drop."""
    with jax.enable_x64(True):
        w = world(num_prompts=2)
        beta = 0.5
        algo = algo_config(num_samples=2, pref_beta=beta)
        theta = w.ref + jnp.asarray([[0.4, -0.5, 0.3], [0.1, 0.2, -0.6]])
        pi = jax.lax.stop_gradient(jnp.exp(jax.nn.log_softmax(theta)))
        t = 0.5 / beta

        def objective(th):
            h = jax.nn.log_softmax(th) - w.ref  # [B, K]
            better = w.rewards[:, :, None] > w.rewards[:, None, :]  # [B, i, j]: i is the best, j the worst
            pair_loss = (h[:, :, None] - t) ** 2 + (h[:, None, :] + t) ** 2
            decided = jnp.sum(2 * pi[:, :, None] * pi[:, None, :] * better * pair_loss, axis=(1, 2))
            same = jnp.sum(pi**2 * ((h - t) ** 2 + (h + t) ** 2), axis=-1)
            return jnp.mean(decided + same)

        np.testing.assert_allclose(expected_gradient("sppo_hard", algo, theta, w), jax.grad(objective)(theta),
                                   atol=1e-12)


def test_policy_logps_joins_sets_whose_fixed_logprobs_differ():
    """J-BOND's policy sample carries ref_logp and its Best-of-2 anchor pick anchor_logp (with
    non-plain sampling the sampler's log-probs are not filled either): `policy_logps` joins the two
    sets for one pass all the same, and splits the pass back per set."""
    def sample_set(first_token, ref_logp, anchor_logp):
        tokens = jnp.full((2, 1, 3), first_token, jnp.int32)
        ones = jnp.ones(tokens.shape, jnp.float32)
        return Samples(tokens, ones, ones, jnp.zeros((2, 1)), None, ref_logp, anchor_logp)

    policy = sample_set(1, jnp.zeros((2, 1)), None)
    best = sample_set(2, None, jnp.zeros((2, 1)))
    logp = lambda s: jnp.sum(s.tokens * s.response_mask, axis=-1)  # a stand-in pass: [B, S]
    inputs = LossInputs(logp, policy, None, None, {}, algo_config(), jax.random.key(0))
    out = algorithms.policy_logps(inputs, policy, best)
    np.testing.assert_array_equal(out[0], 3.0 * np.ones((2, 1)))
    np.testing.assert_array_equal(out[1], 6.0 * np.ones((2, 1)))
