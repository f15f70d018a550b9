"""Best-of-N math: the exact best-of-N distribution, quantiles, bounds, win rates, rejection sampling.

Notation (Sessa et al. 2024, "BOND: Aligning LLMs with Best-of-N Distillation", arXiv 2407.14622):
for one prompt, a reference π_ref over a finite support with rewards r(y),

    p_le(y) = P_{y'~π_ref}[r(y') <= r(y)],   p_lt(y) = P_{y'~π_ref}[r(y') < r(y)],
    m(y)    = p_le(y) − p_lt(y)   (the reference mass of y's tie class).

Every function here works on the LAST axis as the support (or the samples of one prompt) and
broadcasts over any leading batch axes.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


class RewardQuantiles(NamedTuple):
    """Reference-quantile quantities of each support point (all [..., K])."""

    p_lt: jax.Array  # P_ref[r(Y') < r(y)]
    p_gt: jax.Array  # P_ref[r(Y') > r(y)]
    tie_mass: jax.Array  # P_ref[r(Y') = r(y)]

    @property
    def p_le(self) -> jax.Array:
        return self.p_lt + self.tie_mass


def _check_support(fn: str, probs: ArrayLike, rewards: ArrayLike) -> tuple[jax.Array, jax.Array]:
    probs, rewards = jnp.asarray(probs), jnp.asarray(rewards)
    if probs.shape != rewards.shape:
        raise ValueError(
            f"{fn}: `ref_probs` has shape {probs.shape} but `rewards` has shape {rewards.shape}; "
            "give one reward per support point (the support is the last axis)."
        )
    if probs.ndim == 0:
        raise ValueError(f"{fn}: `ref_probs` must have at least one axis (the support).")
    return probs, rewards


def reward_quantiles(ref_probs: ArrayLike, rewards: ArrayLike) -> RewardQuantiles:
    """Exact p_lt, p_gt and tie mass of every support point under π_ref, in O(K log K).

    The tie mass is summed directly over the tie class and p_gt by a reverse cumulative sum, so
    that neither is a difference of two nearly equal numbers: p_le^N for large N needs p_gt
    accurate where p_le is close to 1.
    """
    ref_probs, rewards = _check_support("reward_quantiles", ref_probs, rewards)
    batch_shape, k = rewards.shape[:-1], rewards.shape[-1]
    flat_p = ref_probs.reshape(-1, k)
    flat_r = rewards.reshape(-1, k)

    def one(p: jax.Array, r: jax.Array) -> RewardQuantiles:
        order = jnp.argsort(r)
        r_sorted, p_sorted = r[order], p[order]
        zero = jnp.zeros((1,), p.dtype)
        below = jnp.concatenate([zero, jnp.cumsum(p_sorted)])  # below[i]: mass of sorted[:i]
        above = jnp.concatenate([jnp.cumsum(p_sorted[::-1])[::-1], zero])  # above[i]: mass of sorted[i:]
        first = jnp.searchsorted(r_sorted, r, side="left")  # first sorted index of y's tie class
        end = jnp.searchsorted(r_sorted, r, side="right")  # one past its last
        tie_mass = jnp.zeros((k,), p.dtype).at[first].add(p)[first]
        return RewardQuantiles(p_lt=below[first], p_gt=above[end], tie_mass=tie_mass)

    q = jax.vmap(one)(flat_p, flat_r)
    return RewardQuantiles(*(x.reshape(*batch_shape, k) for x in q))


def _log_p_le(q: RewardQuantiles) -> jax.Array:
    """log p_le, from the small tail p_gt where p_le is close to 1 (accurate for large N)."""
    p_le = q.p_le
    use_tail = q.p_gt < 0.5
    return jnp.where(
        use_tail,
        jnp.log1p(-jnp.where(use_tail, q.p_gt, 0.0)),
        jnp.log(jnp.where(use_tail, 1.0, p_le)),
    )


def bon_log_probs(ref_probs: ArrayLike, rewards: ArrayLike, n: ArrayLike) -> jax.Array:
    """log π_BoN: the exact best-of-n distribution of π_ref, ties broken uniformly at random.

    BOND, Theorem 1 (arXiv 2407.14622). The best of n i.i.d. draws falls in y's tie class with
    probability p_le^n − p_lt^n; a uniform tie-break splits that in proportion to π_ref, so

        π_BoN(y) = π_ref(y) · (p_le^n − p_lt^n) / (p_le − p_lt),

    evaluated as log π_ref − log m + n·log p_le + log(1 − (1 − m/p_le)^n) with log1p/expm1, stable
    for n in the thousands. n may be a non-integer (traced) value. Points with π_ref = 0 get −inf.
    """
    ref_probs, rewards = _check_support("bon_log_probs", ref_probs, rewards)
    q = reward_quantiles(ref_probs, rewards)
    log_p_le = _log_p_le(q)
    positive = ref_probs > 0
    safe_m = jnp.where(positive, q.tie_mass, 1.0)
    safe_p_le = jnp.where(positive, q.p_le, 1.0)
    # 1 − (p_lt/p_le)^n with p_lt/p_le = 1 − m/p_le; log1p(−1) = −inf gives 1 for the lowest class.
    log_one_minus_ratio_n = jnp.log(-jnp.expm1(n * jnp.log1p(-jnp.minimum(safe_m / safe_p_le, 1.0))))
    log_bon = (
        jnp.log(jnp.where(positive, ref_probs, 1.0))
        - jnp.log(safe_m)
        + n * log_p_le
        + log_one_minus_ratio_n
    )
    return jnp.where(positive, log_bon, -jnp.inf)


def bon_probs(ref_probs: ArrayLike, rewards: ArrayLike, n: ArrayLike) -> jax.Array:
    """π_BoN(y) = π_ref(y)·(p_le^n − p_lt^n)/(p_le − p_lt); see `bon_log_probs`."""
    return jnp.exp(bon_log_probs(ref_probs, rewards, n))


def empirical_quantile(
    rewards: ArrayLike, ref_rewards: ArrayLike, ref_weights: Optional[ArrayLike] = None
) -> jax.Array:
    """Monte-Carlo p̂_le(y) = (1/k) Σ_i 1[r(y_i) <= r(y)] from k reference samples of the same prompt.

    rewards [..., M] (the samples to rank), ref_rewards [..., k] → [..., M]. Optional
    `ref_weights [..., k]` (e.g. a padding mask) turn the mean into a weighted mean.
    """
    rewards, ref_rewards = jnp.asarray(rewards), jnp.asarray(ref_rewards)
    if rewards.shape[:-1] != ref_rewards.shape[:-1]:
        raise ValueError(
            f"empirical_quantile: leading axes of `rewards` {rewards.shape} and `ref_rewards` "
            f"{ref_rewards.shape} differ; both must be [..., samples] for the same prompts."
        )
    w = jnp.ones_like(ref_rewards, jnp.float32) if ref_weights is None else jnp.asarray(ref_weights)
    below = ref_rewards[..., None, :] <= rewards[..., :, None]
    # A `where`, not below.astype(float) * w: XLA:CPU (jax 0.10.2) miscompiles that product-sum
    # under jit(vmap(...)) at a few thousand rows (tests/test_bon.py has the case).
    return jnp.sum(jnp.where(below, w[..., None, :], 0.0), axis=-1) / jnp.sum(w, axis=-1, keepdims=True)


def smoothed_log_quantile(
    rewards: ArrayLike, ref_rewards: ArrayLike, ref_weights: Optional[ArrayLike] = None
) -> jax.Array:
    """log((k·p̂_le + 1)/(k + 1)): the log-quantile reward of BOND, finite when no sample is below.

    Add-one smoothing, as in vBoN (Amini et al. 2024, arXiv 2407.06057): it is p̂_le computed
    with one extra reference sample counted as below y, so it lies in [1/(k+1), 1] and never
    gives log 0 = −inf. It biases log p_le up by at most log((k+1)/k) for p_le near 1 and more
    for rare low-reward samples; with weights, k is the total weight.
    """
    rewards, ref_rewards = jnp.asarray(rewards), jnp.asarray(ref_rewards)
    w = jnp.ones_like(ref_rewards, jnp.float32) if ref_weights is None else jnp.asarray(ref_weights)
    k = jnp.sum(w, axis=-1, keepdims=True)
    p_hat = empirical_quantile(rewards, ref_rewards, w)
    return jnp.log((k * p_hat + 1.0) / (k + 1.0))


def kl_upper_bound(n: ArrayLike) -> jax.Array:
    """KL(π_BoN ‖ π_ref) <= log n − (n − 1)/n, with equality in the continuous limit (BOND, §3)."""
    n = jnp.asarray(n, jnp.float32) if not hasattr(n, "dtype") else jnp.asarray(n)
    return jnp.log(n) - (n - 1.0) / n


def kl_divergence(p: ArrayLike, q: ArrayLike) -> jax.Array:
    """KL(p‖q) = Σ p·(log p − log q) over the last axis; 0·log 0 = 0, and +inf where p > 0 = q."""
    p, q = jnp.asarray(p), jnp.asarray(q)
    positive = p > 0
    terms = jnp.where(positive, p * (jnp.log(jnp.where(positive, p, 1.0)) - jnp.log(q)), 0.0)
    return jnp.sum(terms, axis=-1)


def kl_divergence_from_logs(log_p: ArrayLike, log_q: ArrayLike) -> jax.Array:
    """KL(p‖q) from log-probabilities over the last axis (−inf entries allowed in log_p)."""
    log_p, log_q = jnp.asarray(log_p), jnp.asarray(log_q)
    positive = log_p > -jnp.inf
    terms = jnp.where(positive, jnp.exp(log_p) * (log_p - log_q), 0.0)
    return jnp.sum(terms, axis=-1)


def win_rates(ref_probs: ArrayLike, rewards: ArrayLike) -> jax.Array:
    """W(y) = P_{Y'~π_ref}[r(y) > r(Y')] + ½·P[r(y) = r(Y')]: each point's win rate against π_ref."""
    q = reward_quantiles(ref_probs, rewards)
    return q.p_lt + 0.5 * q.tie_mass


def win_rate(probs: ArrayLike, ref_probs: ArrayLike, rewards: ArrayLike) -> jax.Array:
    """P(r(Y) > r(Y')) + ½·P(r(Y) = r(Y')), Y ~ probs, Y' ~ ref_probs independent, over the last axis.

    For Y ~ π_BoN(π_ref) it tends to n/(n+1) in the continuous limit, and is lower with atoms.
    """
    probs = jnp.asarray(probs)
    return jnp.sum(probs * win_rates(ref_probs, rewards), axis=-1)


def best_index(
    rewards: ArrayLike, key: jax.Array, weights: Optional[ArrayLike] = None
) -> jax.Array:
    """Index of the highest reward along the last axis, ties broken uniformly at random.

    Samples with weight 0 (padding) are never chosen unless every sample has weight 0.
    """
    rewards = jnp.asarray(rewards)
    if weights is not None:
        rewards = jnp.where(jnp.asarray(weights) > 0, rewards, -jnp.inf)
    is_max = rewards == jnp.max(rewards, axis=-1, keepdims=True)
    noise = jax.random.uniform(key, rewards.shape)
    return jnp.argmax(jnp.where(is_max, noise, -1.0), axis=-1)


def statistical_rejection_sampling(
    rewards: ArrayLike, key: jax.Array, *, num_accept: int, beta: ArrayLike
) -> jax.Array:
    """RSO's statistical rejection sampling (Liu et al. 2024, arXiv 2309.06657, Algorithm 1).

    Turns k candidates from π_sft (rewards [..., k]) into up to `num_accept` draws approximately
    from π_r ∝ π_sft·exp(r/β). Each round takes r_max, the best reward among the candidates left,
    visits them in order and accepts each with probability exp((r − r_max)/β) until num_accept are
    taken; accepted candidates leave the pool. The round's best is always accepted, so at most
    num_accept rounds run. β → 0 keeps the best num_accept (best-of-k); β → ∞ accepts the first.

    Returns a boolean mask [..., k] of the accepted candidates.
    """
    rewards = jnp.asarray(rewards)
    k = rewards.shape[-1]
    if not 1 <= num_accept <= k:
        raise ValueError(f"statistical_rejection_sampling: `num_accept` must be in [1, {k}], got {num_accept}.")
    flat = rewards.reshape(-1, k)
    keys = jax.random.split(key, (flat.shape[0], num_accept))

    def one(r: jax.Array, round_keys: jax.Array) -> jax.Array:
        def round_(i, accepted):
            remaining = ~accepted
            r_max = jnp.max(jnp.where(remaining, r, -jnp.inf))
            u = jax.random.uniform(round_keys[i], (k,))
            candidate = remaining & (u < jnp.exp((r - r_max) / beta))
            room = num_accept - jnp.sum(accepted)
            take = candidate & (jnp.cumsum(candidate) <= room)
            return accepted | take

        return jax.lax.fori_loop(0, num_accept, round_, jnp.zeros((k,), bool))

    return jax.vmap(one)(flat, keys).reshape(rewards.shape)


def quasi_rejection_acceptance(log_target: ArrayLike, log_proposal: ArrayLike, beta: ArrayLike) -> jax.Array:
    """Quasi-rejection sampling's acceptance probability min(1, P(x)/(β·q(x))).

    Eikema et al. 2022 (arXiv 2112.05702), as in naver/disco: P an unnormalized target, q the
    proposal. Accepted samples follow q_β ∝ min(q, P/β), which tends to p = P/Z as β grows; the
    acceptance rate is E_q[min(P/q, β)]/β.
    """
    log_ratio = jnp.asarray(log_target) - jnp.asarray(log_proposal) - jnp.log(beta)
    return jnp.exp(jnp.minimum(log_ratio, 0.0))


def quasi_rejection_sample(
    key: jax.Array, log_target: ArrayLike, log_proposal: ArrayLike, beta: ArrayLike
) -> jax.Array:
    """Boolean accept mask: u < min(1, P(x)/(β·q(x))) for samples x ~ q."""
    acceptance = quasi_rejection_acceptance(log_target, log_proposal, beta)
    return jax.random.uniform(key, acceptance.shape) < acceptance
