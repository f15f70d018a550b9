"""WIND: sample-efficient losses for the regularized win-rate dominance game.

Yang et al. 2024, "Faster WIND: Accelerating Iterative Best-of-N Distillation for LLM
Alignment", arXiv 2410.20727 (AISTATS 2025). The game: π* = argmax_π E_π[W_{π*}] − β·KL(π‖π_ref),
with W_μ(y) = E_{y'~μ} P(y ≻ y'). One exact mirror-descent step from π_t with step size η is

    log π_{t+1} = [log π_t + ηβ·log π_ref + η·W_{π_t}] / (1 + ηβ) − log Z_t
                = log π_t + ρ·(log π_ref − log π_t) + κ·W_{π_t} − log Z_t,

    ρ = ηβ/(1+ηβ),  κ = η/(1+ηβ)     (bond.tabular.wind_step computes it exactly).

The losses below fit π_θ to that step from S samples y_1..y_S ~ π_t of each prompt, with
h_θ(y) = log π_θ(y) − log π_t(y), a(y) = ρ·(log π_ref − log π_t)(y) and P_ij = P(y_i ≻ y_j).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from bond.losses.common import check_rank, check_same_shape, group_weights, mask_unweighted, weighted_mean

VARIANTS = ("square", "sppo", "kl")


def wind_coefficients(eta: ArrayLike, beta: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """(ρ, κ) = (ηβ/(1+ηβ), η/(1+ηβ)), the weights of the reference pull and the win rate in one step."""
    eta, beta = jnp.asarray(eta), jnp.asarray(beta)
    return eta * beta / (1.0 + eta * beta), eta / (1.0 + eta * beta)


def leave_one_out_win_rate(pref: ArrayLike, weights: ArrayLike) -> jax.Array:
    """Ŵ_i = Σ_{j≠i} w_j·P_ij / Σ_{j≠i} w_j: y_i's win rate against the prompt's other samples.

    pref [B, S, S], weights [B, S] → [B, S]. Where no other sample has weight, Ŵ = ½.
    """
    pref, weights = jnp.asarray(pref), jnp.asarray(weights)
    others = weights[:, None, :] * (1.0 - jnp.eye(weights.shape[-1], dtype=weights.dtype))
    total = jnp.sum(others, axis=-1)
    wins = jnp.sum(others * pref, axis=-1)
    return jnp.where(total > 0, wins / jnp.where(total > 0, total, 1.0), 0.5)


def wind(
    logp: ArrayLike,
    logp_t: ArrayLike,
    ref_logp: ArrayLike,
    pref: ArrayLike,
    *,
    eta: ArrayLike,
    beta: ArrayLike,
    variant: str,
    weights: Optional[ArrayLike] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """WIND loss that moves π_θ to one exact step of the regularized win-rate game.

    Variants (P_ij = pref[b, i, j]; pair weights w_i·w_j; everything but log π_θ is held fixed):
    - 'square' (pairwise): weighted mean over ordered pairs i ≠ j of
          [(h_i − a_i) − (h_j − a_j) − κ·(P_ij − ½)]².
      The best fit f(y_i) − f(y_j) of an antisymmetric target g(y_i, y_j) over i.i.d. pairs is
      f(y) = E_{y'} g(y, y') + c, so the population minimizer over a softmax policy is EXACTLY the
      step above; differences cancel log Z_t (as in IPO), and two samples per prompt suffice.
    - 'sppo' (single sample): weighted mean of [h_i − a_i − κ·(Ŵ_i − ½)]², Ŵ the leave-one-out
      win rate; log Z_t is replaced by its first-order value, as SPPO does, so the minimizer
      matches the step to first order in (ρ, κ).
    - 'kl' (weighted maximum likelihood): −Σ_i ŵ_i·log π_θ(y_i) per prompt, ŵ the softmax over
      the prompt's samples of log w_i + a_i + κ·Ŵ_i: self-normalized importance weights of the
      step's target π_{t+1} ∝ π_t·exp(a + κW) against the sampler π_t. Prompts are averaged with
      weight Σ_i w_i. Its expected minimizer, E[Σ_i ŵ_i·1[y_i = y]], is biased by the
      normalization within each group of S samples, O(1/S), not by Ŵ: on a 3-response bandit
      (tests/test_wind.py, η = 1, β = 0.2) its total variation from the exact step is
      0.028 / 0.014 / 0.007 at S = 4 / 8 / 16 with the exact W in place of Ŵ, and
      0.006 / 0.003 / 0.001 with Ŵ (there the estimate offsets part of the bias).

    Args:
      logp: log π_θ(y) [B, S] (differentiated); logp_t: log π_t(y) [B, S] of the sampling policy;
      ref_logp: log π_ref(y) [B, S]; pref: [B, S, S] with pref[b, i, j] = P(y_i ≻ y_j).
      eta: step size η > 0; beta: KL-to-reference strength β >= 0.
      variant: 'square', 'sppo' or 'kl'.
      weights: optional non-negative [B, S]; weights = π_t over the whole support gives the exact
        expected loss.
    """
    fn = "wind"
    if variant not in VARIANTS:
        raise ValueError(f"{fn}: `variant` must be one of {VARIANTS}, got {variant!r}.")
    logp = check_rank("logp", logp, 2, fn)
    shape = check_same_shape(fn, logp=logp, logp_t=logp_t, ref_logp=ref_logp)
    pref = check_rank("pref", pref, 3, fn)
    if pref.shape != (*shape, shape[-1]):
        raise ValueError(
            f"{fn}: `pref` must have shape [B, S, S] = {(*shape, shape[-1])} (pref[b, i, j] = P(y_i ≻ y_j)) "
            f"but has shape {pref.shape}."
        )
    w = group_weights(fn, weights, shape)
    pair_mask = w[:, :, None] * w[:, None, :]
    logp, logp_t, ref_logp = mask_unweighted(w, logp, jnp.asarray(logp_t), jnp.asarray(ref_logp))
    (pref,) = mask_unweighted(pair_mask, pref)
    sg = jax.lax.stop_gradient
    logp_t, ref_logp, pref = sg(logp_t), sg(ref_logp), sg(pref)
    rho, kappa = wind_coefficients(eta, beta)
    log_ratio = logp - logp_t
    reference_pull = rho * (ref_logp - logp_t)
    win_hat = leave_one_out_win_rate(pref, w)

    if variant == "square":
        f = log_ratio - reference_pull
        residual = f[:, :, None] - f[:, None, :] - kappa * (pref - 0.5)
        pair_w = w[:, :, None] * w[:, None, :] * (1.0 - jnp.eye(shape[-1], dtype=w.dtype))
        loss = weighted_mean(residual**2, pair_w)
    elif variant == "sppo":
        residual = log_ratio - reference_pull - kappa * (win_hat - 0.5)
        loss = weighted_mean(residual**2, w)
    else:  # "kl"
        logits = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)) + reference_pull + kappa * win_hat, -jnp.inf)
        target = sg(jax.nn.softmax(logits, axis=-1))
        per_prompt = -jnp.sum(jnp.where(w > 0, target * logp, 0.0), axis=-1)
        loss = weighted_mean(per_prompt, jnp.sum(w, axis=-1))

    metrics = {
        "loss": loss,
        "win_rate_estimate": weighted_mean(win_hat, w),
        "log_ratio_to_sampler": weighted_mean(sg(log_ratio), w),
        "kl_sampler_to_ref": weighted_mean(logp_t - ref_logp, w),
    }
    return loss, metrics
