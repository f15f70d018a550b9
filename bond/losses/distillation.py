"""Best-of-N distillation losses: BOND's forward, backward and Jeffreys terms, and J-BOND.

Sessa et al. 2024, "BOND: Aligning LLMs with Best-of-N Distillation", arXiv 2407.14622.
Inputs are sequence log-probabilities of responses in groups [B, S] (B prompts, S samples each);
each loss returns (loss, metrics), and its gradient averaged over samples converges to the
gradient of the objective named in its docstring.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from bond.losses.common import (
    check_rank,
    check_same_shape,
    group_weights,
    leave_one_out_mean,
    mask_unweighted,
    reinforce_surrogate,
    weighted_mean,
)

LOG_16 = math.log(16.0)


def bond_backward_kl(
    logp: ArrayLike,
    ref_logp: ArrayLike,
    log_quantile: ArrayLike,
    *,
    n: ArrayLike,
    weights: Optional[ArrayLike] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Backward KL(π‖π_BoN) by policy gradient on policy samples y ~ π (BOND §4.2).

    Since log π_BoN = log π_ref + (n−1)·log p_le + log B, with log B ∈ [0, log n] and constant in
    the continuous limit, the objective is

        J(θ) = E_π[log π(y) − log π_ref(y) − (n−1)·log p_le(y)],
        ∇J   = E_π[∇log π(y) · (log π − log π_ref − (n−1)·log p_le)(y)]   (E_π[∇log π] = 0).

    The surrogate is the weighted mean of stop_gradient(c − b)·log π with cost c as above and b
    the leave-one-out mean cost of the other samples of the same prompt (none when S = 1).

    Args:
      logp: log π(y) [B, S] of the policy samples (differentiated).
      ref_logp: log π_ref(y) [B, S].
      log_quantile: log p_le(y) [B, S], exact or estimated (e.g. bon.smoothed_log_quantile).
      n: N of best-of-N (may be a traced float).
      weights: optional non-negative [B, S].
    """
    fn = "bond_backward_kl"
    logp = check_rank("logp", logp, 2, fn)
    shape = check_same_shape(fn, logp=logp, ref_logp=ref_logp, log_quantile=log_quantile)
    w = group_weights(fn, weights, shape)
    logp, ref_logp, log_quantile = mask_unweighted(w, logp, jnp.asarray(ref_logp), jnp.asarray(log_quantile))
    log_ratio = logp - ref_logp
    cost = log_ratio - (n - 1.0) * log_quantile
    baseline = leave_one_out_mean(jax.lax.stop_gradient(cost), w, axis=-1)
    loss = reinforce_surrogate(logp, cost, w, baseline)
    metrics = {
        "loss": loss,
        "backward_objective": weighted_mean(jax.lax.stop_gradient(cost), w),
        "kl_to_ref": weighted_mean(jax.lax.stop_gradient(log_ratio), w),
        "log_quantile": weighted_mean(log_quantile, w),
    }
    return loss, metrics


def bond_forward_kl(
    bon_logp: ArrayLike, *, weights: Optional[ArrayLike] = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Forward KL(π_BoN‖π) by supervised fine-tuning on best-of-N samples (BOND §4.1).

        ∇KL(π_BoN‖π) = −E_{y~π_BoN}[∇log π(y)];   loss = −weighted mean of log π(y_BoN).

    Args:
      bon_logp: log π of best-of-N samples, any shape ([B] one per prompt, or [B, S]).
      weights: optional non-negative weights of the same shape.
    """
    bon_logp = jnp.asarray(bon_logp)
    w = group_weights("bond_forward_kl", weights, bon_logp.shape)
    (bon_logp,) = mask_unweighted(w, bon_logp)
    loss = -weighted_mean(bon_logp, w)
    return loss, {"loss": loss, "forward_nll": loss}


def jeffreys_bond(
    logp: ArrayLike,
    ref_logp: ArrayLike,
    log_quantile: ArrayLike,
    bon_logp: ArrayLike,
    *,
    n: ArrayLike,
    beta: ArrayLike,
    weights: Optional[ArrayLike] = None,
    bon_weights: Optional[ArrayLike] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """BOND's Jeffreys divergence J_β = (1−β)·KL(π_BoN‖π) + β·KL(π‖π_BoN) (BOND §4.3, Algorithm 1).

    β = 0 is pure forward KL (SFT on best-of-N), β = 1 pure backward KL; the paper uses β = 0.5.
    `logp, ref_logp, log_quantile, weights` are the policy samples [B, S] of `bond_backward_kl`;
    `bon_logp, bon_weights` the best-of-N samples of `bond_forward_kl`.
    """
    forward, forward_metrics = bond_forward_kl(bon_logp, weights=bon_weights)
    backward, backward_metrics = bond_backward_kl(logp, ref_logp, log_quantile, n=n, weights=weights)
    loss = (1.0 - beta) * forward + beta * backward
    return loss, {**forward_metrics, **backward_metrics, "loss": loss}


def j_bond_reward(rewards: ArrayLike, anchor_rewards: ArrayLike) -> jax.Array:
    """r_J(y) = −log 16 if r(y) < min(r(y'_1), r(y'_2)) else 0, for anchor samples y'_1, y'_2.

    J-BOND's reward (BOND §6): its expectation −log 16 · P_anchor[r(Y') > r(y)]² matches
    log p_le(y) where p_le = ½ (4·log ½ = −log 16) and mimics its shape. Ties count as not worse
    (strict <). rewards [B, S], anchor_rewards [B, 2] → [B, S].
    """
    rewards, anchor_rewards = jnp.asarray(rewards), jnp.asarray(anchor_rewards)
    worst_anchor = jnp.min(anchor_rewards, axis=-1, keepdims=True)
    return jnp.where(rewards < worst_anchor, -LOG_16, 0.0)


def j_bond(
    logp: ArrayLike,
    anchor_logp: ArrayLike,
    rewards: ArrayLike,
    anchor_rewards: ArrayLike,
    bo2_logp: ArrayLike,
    *,
    beta: ArrayLike,
    gamma: ArrayLike,
    weights: Optional[ArrayLike] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """J-BOND: Jeffreys divergence to Best-of-2 of a moving anchor (BOND §6, Algorithm 2).

    Per prompt: policy samples y ~ π and two anchor samples y'_1, y'_2 ~ π_anchor. With the
    anchor fixed, the loss's expected gradient is the gradient of

        (1−β)·KL(Bo2(π_anchor)‖π) + β·E_π[log π − log π_anchor − r_J] + γ·KL(π‖π_anchor):

    - forward: SFT on the better anchor sample (an exact Best-of-2 sample of the anchor);
    - backward: REINFORCE with return R = r_J − (log π − log π_anchor), r_J from `j_bond_reward`;
    - regularizer: γ·KL(π‖π_anchor) with gradient E_π[∇log π·(log π − log π_anchor)], the sign that
      DECREASES that KL (the printed Algorithm 2's sign would increase it under gradient descent).
    Both policy-gradient terms share the batch leave-one-out baseline: each sample's baseline is
    the mean cost of every other policy sample in the batch (all prompts), as in the paper.

    Args:
      logp: log π(y) [B, S] of the policy samples (differentiated).
      anchor_logp: log π_anchor(y) [B, S] of the same samples.
      rewards: r(y) [B, S]; anchor_rewards: [B, 2] rewards of the two anchor samples.
      bo2_logp: [B] log π of the better anchor sample (differentiated).
      beta: forward/backward mix; gamma: weight of KL(π‖π_anchor) (>= 0).
      weights: optional non-negative [B, S]; a prompt's forward term has weight max_s w[b, s].
    """
    fn = "j_bond"
    logp = check_rank("logp", logp, 2, fn)
    shape = check_same_shape(fn, logp=logp, anchor_logp=anchor_logp, rewards=rewards)
    anchor_rewards = check_rank("anchor_rewards", anchor_rewards, 2, fn)
    if anchor_rewards.shape != (shape[0], 2):
        raise ValueError(
            f"{fn}: `anchor_rewards` must have shape [B, 2] = {(shape[0], 2)} (two anchor samples per "
            f"prompt) but has shape {anchor_rewards.shape}."
        )
    bo2_logp = check_rank("bo2_logp", bo2_logp, 1, fn)
    if bo2_logp.shape != (shape[0],):
        raise ValueError(f"{fn}: `bo2_logp` must have shape [B] = {(shape[0],)} but has shape {bo2_logp.shape}.")
    w = group_weights(fn, weights, shape)
    logp, anchor_logp, rewards = mask_unweighted(w, logp, jnp.asarray(anchor_logp), jnp.asarray(rewards))

    r_j = j_bond_reward(rewards, anchor_rewards)
    log_ratio = logp - anchor_logp
    backward_cost = log_ratio - r_j
    cost = beta * backward_cost + gamma * log_ratio
    baseline = leave_one_out_mean(jax.lax.stop_gradient(cost), w, axis=(0, 1))
    policy_gradient = reinforce_surrogate(logp, cost, w, baseline)
    forward, _ = bond_forward_kl(bo2_logp, weights=jnp.max(w, axis=-1))
    loss = (1.0 - beta) * forward + policy_gradient

    sg = jax.lax.stop_gradient
    metrics = {
        "loss": loss,
        "forward_nll": forward,
        "backward_return": weighted_mean(sg(-backward_cost), w),
        "kl_to_anchor": weighted_mean(sg(log_ratio), w),
        "j_bond_reward": weighted_mean(r_j, w),
        "frac_worse_than_both": weighted_mean((r_j < 0).astype(jnp.float32), w),
    }
    return loss, metrics
