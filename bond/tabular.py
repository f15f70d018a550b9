"""The exact finite-support world: softmax policies over K responses per context.

Every quantity the sampled algorithms estimate is a finite sum here: divergences, best-of-N
and iterated best-of-N, win rates, the WIND step and equilibrium, and the exact objectives
whose gradients the sample-based losses must estimate without bias. Tests and bandit
experiments stand on it. Policies are given as logits or log-probabilities over the last axis.
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from bond import bon


def iterated_bon_probs(ref_probs: ArrayLike, rewards: ArrayLike, n: ArrayLike, rounds: int) -> jax.Array:
    """Best-of-n applied `rounds` times: iterative BOND's target after M anchor moves (BOND §5).

    Equals best-of-n^M of π_ref exactly, since the reward CDF goes F → F^n → F^{n^2} → ...
    """
    probs = jnp.asarray(ref_probs)
    for _ in range(rounds):
        probs = bon.bon_probs(probs, rewards, n)
    return probs


def win_rates_against(pref: ArrayLike, probs: ArrayLike) -> jax.Array:
    """W_μ(y) = Σ_{y'} μ(y')·P(y ≻ y') for pref [..., K, K] and μ = probs [..., K]."""
    return jnp.einsum("...ij,...j->...i", jnp.asarray(pref), jnp.asarray(probs))


def wind_step(
    log_pi_t: ArrayLike, log_pi_ref: ArrayLike, pref: ArrayLike, *, eta: ArrayLike, beta: ArrayLike
) -> jax.Array:
    """One exact WIND step: mirror descent on the regularized win-rate game (Yang et al. 2024, arXiv 2410.20727).

        π_{t+1} = argmax_π E_π[W_{π_t}] − β·KL(π‖π_ref) − (1/η)·KL(π‖π_t)
        log π_{t+1} = [log π_t + ηβ·log π_ref + η·W_{π_t}] / (1 + ηβ) − log Z_t.

    Returns log π_{t+1} [..., K].
    """
    log_pi_t, log_pi_ref = jnp.asarray(log_pi_t), jnp.asarray(log_pi_ref)
    w = win_rates_against(pref, jnp.exp(log_pi_t))
    unnormalized = (log_pi_t + eta * beta * log_pi_ref + eta * w) / (1.0 + eta * beta)
    return jax.nn.log_softmax(unnormalized, axis=-1)


def wind_equilibrium(
    log_pi_ref: ArrayLike, pref: ArrayLike, *, beta: ArrayLike, eta: float = 1.0, num_steps: int = 2000
) -> jax.Array:
    """The regularized game's equilibrium π* ∝ π_ref·exp(W_{π*}/β), by iterating `wind_step`.

    The fixed point of the step is exactly this equilibrium. For a preference antisymmetric
    about ½ the game is monotone and, with the β-strongly-convex KL regularizer, mirror descent
    converges linearly; `num_steps` steps of size η are run (check the residual with
    `equilibrium_residual`).
    """
    log_pi_ref = jnp.asarray(log_pi_ref)

    def body(_, log_pi):
        return wind_step(log_pi, log_pi_ref, pref, eta=eta, beta=beta)

    return jax.lax.fori_loop(0, num_steps, body, log_pi_ref)


def equilibrium_residual(log_pi: ArrayLike, log_pi_ref: ArrayLike, pref: ArrayLike, *, beta: ArrayLike) -> jax.Array:
    """max |log π − log softmax(log π_ref + W_π/β)|: zero exactly at the WIND equilibrium."""
    log_pi = jnp.asarray(log_pi)
    target = jax.nn.log_softmax(jnp.asarray(log_pi_ref) + win_rates_against(pref, jnp.exp(log_pi)) / beta, axis=-1)
    return jnp.max(jnp.abs(log_pi - target))


# ---------------------------------------------------------------------------------------------
# Exact objectives. Each is a differentiable function of the policy logits whose gradient the
# matching sample-based loss in bond.losses estimates.
# ---------------------------------------------------------------------------------------------


def bond_backward_objective(
    logits: ArrayLike, ref_log_probs: ArrayLike, log_quantile: ArrayLike, *, n: ArrayLike
) -> jax.Array:
    """E_π[log π − log π_ref − (n−1)·log p_le]: KL(π‖π_BoN) up to the bounded log B term (BOND §4)."""
    log_pi = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    cost = log_pi - jnp.asarray(ref_log_probs) - (n - 1.0) * jnp.asarray(log_quantile)
    return jnp.sum(jnp.exp(log_pi) * cost, axis=-1)


def forward_kl_objective(logits: ArrayLike, target_probs: ArrayLike) -> jax.Array:
    """KL(target‖π) = Σ target·(log target − log π): the forward KL that SFT on target samples minimizes."""
    log_pi = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    target = jnp.asarray(target_probs)
    positive = target > 0
    terms = jnp.where(positive, target * (jnp.log(jnp.where(positive, target, 1.0)) - log_pi), 0.0)
    return jnp.sum(terms, axis=-1)


def jeffreys_bond_objective(
    logits: ArrayLike,
    ref_log_probs: ArrayLike,
    log_quantile: ArrayLike,
    bon_target: ArrayLike,
    *,
    n: ArrayLike,
    beta: ArrayLike,
) -> jax.Array:
    """(1−β)·KL(π_BoN‖π) + β·[backward objective]: BOND's Jeffreys divergence (BOND §4.3)."""
    forward = forward_kl_objective(logits, bon_target)
    backward = bond_backward_objective(logits, ref_log_probs, log_quantile, n=n)
    return (1.0 - beta) * forward + beta * backward


def j_bond_objective(
    logits: ArrayLike, anchor_log_probs: ArrayLike, rewards: ArrayLike, *, beta: ArrayLike, gamma: ArrayLike
) -> jax.Array:
    """The objective J-BOND's loss estimates, for a fixed anchor (BOND §6, Algorithm 2).

        (1−β)·KL(Bo2(π_anchor)‖π) + β·E_π[log π − log π_anchor − r̄_J] + γ·KL(π‖π_anchor),

    with r̄_J(y) = −log 16 · P_{y'_1, y'_2 ~ π_anchor}[r(y) < min(r(y'_1), r(y'_2))]
              = −log 16 · P_anchor[r(Y') > r(y)]², the expected J-BOND reward of y.
    """
    log_pi = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    anchor_log_probs = jnp.asarray(anchor_log_probs)
    anchor_probs = jnp.exp(anchor_log_probs)
    bo2 = bon.bon_probs(anchor_probs, rewards, 2)
    p_gt = bon.reward_quantiles(anchor_probs, rewards).p_gt
    expected_r_j = -jnp.log(16.0) * p_gt**2
    pi = jnp.exp(log_pi)
    backward = jnp.sum(pi * (log_pi - anchor_log_probs - expected_r_j), axis=-1)
    regularizer = jnp.sum(pi * (log_pi - anchor_log_probs), axis=-1)
    return (1.0 - beta) * forward_kl_objective(logits, bo2) + beta * backward + gamma * regularizer


def exact_expectation(
    fn: Callable[..., jax.Array], draws: Sequence[tuple[ArrayLike, int]]
) -> jax.Array:
    """E[fn(idx_1, ..., idx_D)] with idx_d [S_d] i.i.d. from probs_d, summed over every joint draw.

    `draws` is a list of (probs [K_d], S_d). The sum runs over Π K_d^{S_d} joint draws, so keep
    them small; it gives the exact expected value (e.g. the expected gradient of a sampled
    loss), with no Monte-Carlo error. `fn` must return a pytree of arrays.
    """
    axes = []
    for probs, count in draws:
        axes.extend([jnp.asarray(probs)] * count)
    grids = jnp.asarray(list(itertools.product(*[range(p.shape[-1]) for p in axes])), jnp.int32)
    log_weights = sum(jnp.log(p)[grids[:, i]] for i, p in enumerate(axes))
    splits = list(itertools.accumulate([count for _, count in draws]))[:-1]

    def call(row):
        return fn(*jnp.split(row, splits))

    values = jax.vmap(call)(grids)
    weights = jnp.exp(log_weights)
    return jax.tree.map(lambda v: jnp.tensordot(weights, v, axes=1), values)
