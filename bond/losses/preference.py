"""Offline pairwise preference losses: DPO, IPO and SPPO (hard labels).

Each takes, per pair b of a batch of B pairs, the sequence log-probabilities of the chosen (w)
and rejected (l) responses under the policy and the reference, and averages over pairs. With

    h_w = log π_θ(y_w) − log π_ref(y_w),   h_l = log π_θ(y_l) − log π_ref(y_l),   Δ = h_w − h_l,

β·h is the implicit reward of DPO, and β·Δ the implicit reward margin. The log-probs are used
as given: length normalization (IPO's paper averages per token) is the caller's choice.
At π_θ = π_ref (h = 0): DPO = ln 2, IPO = 1/(4β²), SPPO-hard = 1/(2β²).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from bond.losses.common import check_rank, check_same_shape, group_weights, weighted_mean
from bond.losses.common import Metrics, check_in_range, mask_unweighted


def _log_ratios(
    fn: str,
    chosen_logp: ArrayLike,
    rejected_logp: ArrayLike,
    ref_chosen_logp: ArrayLike,
    ref_rejected_logp: ArrayLike,
    beta: ArrayLike,
    weights: Optional[ArrayLike],
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Checks the inputs; returns (h_w, h_l, pair weights), with unweighted pairs zeroed."""
    arrays = {
        "chosen_logp": chosen_logp,
        "rejected_logp": rejected_logp,
        "ref_chosen_logp": ref_chosen_logp,
        "ref_rejected_logp": ref_rejected_logp,
    }
    arrays = {name: check_rank(name, a, 1, fn) for name, a in arrays.items()}
    shape = check_same_shape(fn, **arrays)
    w = group_weights(fn, weights, shape)
    check_in_range(fn, "beta", beta, minimum=0.0, strict_minimum=True)
    c, r, rc, rr = mask_unweighted(w, *arrays.values())
    return c - rc, r - rr, w


def _pair_metrics(loss: jax.Array, h_w: jax.Array, h_l: jax.Array, beta: ArrayLike, w: jax.Array) -> Metrics:
    """Implicit rewards β·h of the chosen and rejected responses, their margin, and accuracy.

    Accuracy is the weighted fraction of pairs with a strictly positive margin (ties count as
    wrong, as in TRL's `rewards/accuracies`), so it is 0 at π_θ = π_ref.
    """
    h_w, h_l = jax.lax.stop_gradient(h_w), jax.lax.stop_gradient(h_l)
    chosen_reward, rejected_reward = beta * h_w, beta * h_l
    return {
        "loss": loss,
        "chosen_reward": weighted_mean(chosen_reward, w),
        "rejected_reward": weighted_mean(rejected_reward, w),
        "reward_margin": weighted_mean(chosen_reward - rejected_reward, w),
        "accuracy": weighted_mean((h_w > h_l).astype(jnp.result_type(float)), w),
    }


def dpo(
    chosen_logp: ArrayLike,
    rejected_logp: ArrayLike,
    ref_chosen_logp: ArrayLike,
    ref_rejected_logp: ArrayLike,
    *,
    beta: ArrayLike,
    weights: Optional[ArrayLike] = None,
) -> tuple[jax.Array, Metrics]:
    """Direct Preference Optimization: mean over pairs of −log σ(β·Δ).

    Rafailov et al. 2023, arXiv 2305.18290. The Bradley–Terry likelihood of the preference under
    the implicit reward β·log(π_θ/π_ref); computed as −log_sigmoid, finite for any |βΔ|.

    Args:
      chosen_logp, rejected_logp: [B] log π_θ of the chosen and rejected responses.
      ref_chosen_logp, ref_rejected_logp: [B] the same under π_ref.
      beta: β > 0 (may be traced).
      weights: optional [B] non-negative pair weights.

    Returns:
      (loss, metrics) with 'loss', 'chosen_reward', 'rejected_reward', 'reward_margin', 'accuracy'.
    """
    h_w, h_l, w = _log_ratios(
        "dpo", chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta, weights
    )
    loss = weighted_mean(-jax.nn.log_sigmoid(beta * (h_w - h_l)), w)
    return loss, _pair_metrics(loss, h_w, h_l, beta, w)


def ipo(
    chosen_logp: ArrayLike,
    rejected_logp: ArrayLike,
    ref_chosen_logp: ArrayLike,
    ref_rejected_logp: ArrayLike,
    *,
    beta: ArrayLike,
    weights: Optional[ArrayLike] = None,
) -> tuple[jax.Array, Metrics]:
    """Identity Preference Optimization: mean over pairs of (Δ − 1/(2β))².

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", arXiv 2310.12036 (the IPO loss with hard preference labels; here β is the
    paper's τ). It regresses the log-ratio margin onto 1/(2β) instead of pushing it to infinity.

    Args and returns as `dpo`.
    """
    h_w, h_l, w = _log_ratios(
        "ipo", chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta, weights
    )
    loss = weighted_mean(jnp.square(h_w - h_l - 0.5 / beta), w)
    return loss, _pair_metrics(loss, h_w, h_l, beta, w)


def sppo_hard(
    chosen_logp: ArrayLike,
    rejected_logp: ArrayLike,
    ref_chosen_logp: ArrayLike,
    ref_rejected_logp: ArrayLike,
    *,
    beta: ArrayLike,
    weights: Optional[ArrayLike] = None,
) -> tuple[jax.Array, Metrics]:
    """Self-Play Preference Optimization with hard labels: mean of (h_w − 1/(2β))² + (h_l + 1/(2β))².

    Wu et al. 2024, arXiv 2405.00675. SPPO regresses each log-ratio h(y) onto (P̂(y wins) − ½)/β;
    with hard labels the winner's win probability is 1 and the loser's 0, which is TRL's
    `sppo_hard` variant of DPOTrainer. Unlike DPO/IPO, each response's log-ratio is pinned
    separately, not only their difference.

    Args and returns as `dpo`.
    """
    h_w, h_l, w = _log_ratios(
        "sppo_hard", chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta, weights
    )
    target = 0.5 / beta
    loss = weighted_mean(jnp.square(h_w - target) + jnp.square(h_l + target), w)
    return loss, _pair_metrics(loss, h_w, h_l, beta, w)
