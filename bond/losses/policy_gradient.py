"""Policy-gradient baselines: REINFORCE with a KL penalty and an RLOO baseline, and vBoN.

Both minimize a backward-KL-regularized objective on samples of the policy itself,

    L(θ) = E_{y~π_θ}[ β (log π_θ(y) − log π_ref(y)) − r(y) ] = β·KL(π_θ‖π_ref) − E_{π_θ}[r],

with the score-function (REINFORCE) estimate of its gradient. Groups are [B, S]: B prompts, S
samples of each prompt's policy.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from bond.losses.common import (
    Metrics,
    check_in_range,
    check_rank,
    check_same_shape,
    group_weights,
    leave_one_out_mean,
    mask_unweighted,
    reinforce_surrogate,
    weighted_mean,
    weighted_std,
)

def reinforce(
    logp: ArrayLike,
    ref_logp: ArrayLike,
    rewards: ArrayLike,
    *,
    beta: ArrayLike,
    weights: Optional[ArrayLike] = None,
) -> tuple[jax.Array, Metrics]:
    """REINFORCE with a KL penalty and the leave-one-out (RLOO) baseline.

    Objective, per prompt x, minimized:

        L(θ) = E_{y~π_θ}[ β (log π_θ(y) − log π_ref(y)) − r(y) ] = β·KL(π_θ‖π_ref) − E_{π_θ}[r].

    The return of sample y_i is R_i = r(y_i) − β (log π_θ(y_i) − log π_ref(y_i)); the surrogate

        mean_i stop_gradient(−R_i + b_i) · log π_θ(y_i),   b_i = mean_{j≠i} R_j  (same prompt),

    has a gradient whose expectation is ∇L(θ). The return depends on θ through log π_θ, but the
    pathwise term E_π[∇ β log π_θ] = β Σ_y ∇π_θ(y) = 0, so the score-function term alone is the
    whole gradient. b_i is independent of y_i (Kool et al. 2019, "Buy 4 REINFORCE samples, get a
    baseline for free!"), so it reduces variance without bias; with S = 1 there is no baseline.

    Williams 1992 (REINFORCE); Ahmadian et al. 2024, arXiv 2402.14740 (RLOO for RLHF); BOND
    (Sessa et al. 2024, arXiv 2407.14622) uses it as its REINFORCE baseline with β_RL.

    Args:
      logp: [B, S] log π_θ(y) of each sample (differentiated).
      ref_logp: [B, S] log π_ref(y).
      rewards: [B, S] r(x, y).
      beta: KL coefficient β >= 0 (may be traced).
      weights: optional [B, S] non-negative sample weights (0 = padding).

    Returns:
      (loss, metrics): the surrogate; metrics 'loss', 'objective' (the estimate of L),
      'reward_mean', 'kl' (estimate of KL(π_θ‖π_ref)), 'return_mean', 'advantage_std'.
    """
    fn = "reinforce"
    logp = check_rank("logp", logp, 2, fn)
    ref_logp = check_rank("ref_logp", ref_logp, 2, fn)
    rewards = check_rank("rewards", rewards, 2, fn)
    shape = check_same_shape(fn, logp=logp, ref_logp=ref_logp, rewards=rewards)
    w = group_weights(fn, weights, shape)
    check_in_range(fn, "beta", beta, minimum=0.0)
    logp, ref_logp, rewards = mask_unweighted(w, logp, ref_logp, rewards)

    log_ratio = jax.lax.stop_gradient(logp) - ref_logp
    cost = beta * log_ratio - rewards  # −R: the per-sample value of the objective
    baseline = leave_one_out_mean(cost, w, axis=-1)
    loss = reinforce_surrogate(logp, cost, w, baseline)
    metrics = {
        "loss": loss,
        "objective": weighted_mean(cost, w),
        "reward_mean": weighted_mean(rewards, w),
        "kl": weighted_mean(log_ratio, w),
        "return_mean": weighted_mean(-cost, w),
        "advantage_std": weighted_std(baseline - cost, w),
    }
    return loss, metrics


def vbon_reward(log_quantile: ArrayLike, *, n: ArrayLike) -> jax.Array:
    """vBoN's reward in units of the KL: (N − 1)·log F(r(y)).

    With it and β = 1, `reinforce` minimizes KL(π‖π_ref) − (N − 1)·E_π[log F(r(y))], which is
    (N − 1) times vBoN's objective E_π[log F] − KL/(N − 1) negated (reward log F, β = 1/(N − 1)).
    """
    check_in_range("vbon_reward", "n", n, minimum=1.0)
    return (n - 1.0) * jnp.asarray(log_quantile)


def vbon(
    logp: ArrayLike,
    ref_logp: ArrayLike,
    log_quantile: ArrayLike,
    *,
    n: ArrayLike,
    weights: Optional[ArrayLike] = None,
) -> tuple[jax.Array, Metrics]:
    """Variational best-of-N: backward KL to the continuous best-of-N distribution.

    Amini et al. 2024, "Variational Best-of-N Alignment", arXiv 2407.06057. With F the reward's
    CDF under π_ref, π_BoN = N·π_ref·F(r)^{N−1} in the continuous limit, so up to a constant

        KL(π_θ‖π_BoN) = KL(π_θ‖π_ref) − (N − 1)·E_{π_θ}[log F(r(y))],

    the objective minimized here: `reinforce` with reward (N − 1)·log F and β = 1 (RLOO baseline,
    same score-function gradient). `log_quantile` is log F(r(y)) as estimated by the caller, e.g.
    `bond.bon.smoothed_log_quantile` from reference samples of the same prompt.

    Args:
      logp: [B, S] log π_θ(y) (differentiated).
      ref_logp: [B, S] log π_ref(y).
      log_quantile: [B, S] log F(r(y)) <= 0.
      n: N >= 1 of best-of-N (may be traced).
      weights: optional [B, S] non-negative sample weights.

    Returns:
      (loss, metrics): as `reinforce` ('objective' estimates KL(π‖π_ref) − (N−1)·E log F),
      plus 'log_quantile_mean'.
    """
    fn = "vbon"
    logp = check_rank("logp", logp, 2, fn)
    ref_logp = check_rank("ref_logp", ref_logp, 2, fn)
    log_quantile = check_rank("log_quantile", log_quantile, 2, fn)
    shape = check_same_shape(fn, logp=logp, ref_logp=ref_logp, log_quantile=log_quantile)
    w = group_weights(fn, weights, shape)
    (log_quantile,) = mask_unweighted(w, log_quantile)
    loss, metrics = reinforce(logp, ref_logp, vbon_reward(log_quantile, n=n), beta=1.0, weights=w)
    metrics["log_quantile_mean"] = weighted_mean(log_quantile, w)
    return loss, metrics
