"""Fine-tuning on the best of n samples: RAFT (best-of-n SFT) and BoNBoN.

Groups are [B, S]: the S = n samples of each of B prompts, with their rewards. The best (and
for BoNBoN the worst) sample of each prompt is chosen with `bond.bon.best_index`, ties broken
uniformly at random, so the chosen sample is an exact draw of best-of-n of the sampling policy.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from bond.bon import best_index
from bond.losses.common import check_rank, check_same_shape, group_weights, weighted_mean
from bond.losses.common import Metrics, check_in_range, mask_unweighted


def _one_hot_weights(index: jax.Array, w: jax.Array) -> jax.Array:
    """[B, S] weights selecting sample index[b] of each prompt, carrying that sample's own weight."""
    return jax.nn.one_hot(index, w.shape[-1], dtype=w.dtype) * w


def _chosen(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[b, index[b]] for each prompt b."""
    return jnp.take_along_axis(x, index[:, None], axis=-1)[:, 0]


def best_of_n_sft(
    logp: ArrayLike,
    rewards: ArrayLike,
    *,
    key: jax.Array,
    weights: Optional[ArrayLike] = None,
) -> tuple[jax.Array, Metrics]:
    """RAFT: supervised fine-tuning on the highest-reward sample of each prompt.

    Dong et al. 2023, "RAFT: Reward rAnked FineTuning for Generative Foundation Model Alignment",
    arXiv 2304.06767. Per prompt, with y* the best of its n samples (ties broken uniformly with
    `key`), the loss is −log π_θ(y*), averaged over prompts weighted by y*'s sample weight. When
    the samples come from π_ref, y* ~ π_BoN and the gradient's expectation is ∇KL(π_BoN‖π_θ):
    BOND's forward-KL term.

    Args:
      logp: [B, S] log π_θ(y) (differentiated).
      rewards: [B, S] r(x, y).
      key: PRNG key for the tie-break.
      weights: optional [B, S] non-negative sample weights; weight-0 samples are never chosen.

    Returns:
      (loss, metrics) with 'loss', 'best_reward_mean', 'reward_mean'.
    """
    fn = "best_of_n_sft"
    logp = check_rank("logp", logp, 2, fn)
    rewards = check_rank("rewards", rewards, 2, fn)
    shape = check_same_shape(fn, logp=logp, rewards=rewards)
    w = group_weights(fn, weights, shape)
    logp, rewards = mask_unweighted(w, logp, rewards)
    best = best_index(rewards, key, w)
    best_w = _one_hot_weights(best, w)
    loss = weighted_mean(-logp, best_w)
    metrics = {
        "loss": loss,
        "best_reward_mean": weighted_mean(rewards, best_w),
        "reward_mean": weighted_mean(rewards, w),
    }
    return loss, metrics


def bonbon_beta(n: int) -> float:
    """BoNBoN's β: the one with 1/(2β) = (n − 1)·H_{n−1}, H_k = Σ_{i≤k} 1/i.

    Gui et al. 2024, arXiv 2406.00832: (n − 1)·H_{n−1} is the expected log-ratio gap
    log π_BoN(y_best)/π_ref(y_best) − log π_BoN(y_worst)/π_ref(y_worst) between the best and the
    worst of n samples (continuous rewards), so IPO with this β fits the best-of-n policy.
    1/(2β) = 18.15 at n = 8.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 2:
        raise ValueError(f"bonbon_beta: `n` must be an integer >= 2 (samples per prompt), got {n!r}.")
    harmonic = math.fsum(1.0 / i for i in range(1, n))
    return 1.0 / (2.0 * (int(n) - 1) * harmonic)


def bonbon(
    logp: ArrayLike,
    ref_logp: ArrayLike,
    rewards: ArrayLike,
    *,
    alpha: ArrayLike,
    beta: ArrayLike,
    key: jax.Array,
    weights: Optional[ArrayLike] = None,
) -> tuple[jax.Array, Metrics]:
    """BoNBoN: α·SFT(best of n) + (1 − α)·IPO(best vs worst of n).

    Gui et al. 2024, "BoNBoN Alignment for Large Language Models and the Sweetness of Best-of-n
    Sampling", arXiv 2406.00832. Per prompt, with y_w the best and y_l the worst of its n
    samples from π_ref (ties broken uniformly with two keys split from `key`),

        α · (−log π_θ(y_w)) + (1 − α) · (h(y_w) − h(y_l) − 1/(2β))²,   h = log π_θ − log π_ref,

    and β = `bonbon_beta(n)` makes the IPO term's minimizer the best-of-n policy. The SFT term is
    averaged over prompts weighted by y_w's weight, the IPO term by the pair weight w_w·w_l; a
    prompt whose best and worst rewards are equal carries no preference and is left out of the
    IPO term.

    Args:
      logp: [B, S] log π_θ(y) (differentiated).
      ref_logp: [B, S] log π_ref(y).
      rewards: [B, S] r(x, y).
      alpha: α in [0, 1] (may be traced).
      beta: β > 0 (may be traced); see `bonbon_beta`.
      key: PRNG key for the tie-breaks.
      weights: optional [B, S] non-negative sample weights; weight-0 samples are never chosen.

    Returns:
      (loss, metrics) with 'loss', 'sft_loss', 'ipo_loss', 'margin' (mean h(y_w) − h(y_l)),
      'best_reward_mean', 'worst_reward_mean'.
    """
    fn = "bonbon"
    logp = check_rank("logp", logp, 2, fn)
    ref_logp = check_rank("ref_logp", ref_logp, 2, fn)
    rewards = check_rank("rewards", rewards, 2, fn)
    shape = check_same_shape(fn, logp=logp, ref_logp=ref_logp, rewards=rewards)
    w = group_weights(fn, weights, shape)
    check_in_range(fn, "alpha", alpha, minimum=0.0, maximum=1.0)
    check_in_range(fn, "beta", beta, minimum=0.0, strict_minimum=True)
    logp, ref_logp, rewards = mask_unweighted(w, logp, ref_logp, rewards)

    best_key, worst_key = jax.random.split(key)
    best = best_index(rewards, best_key, w)
    worst = best_index(-rewards, worst_key, w)
    best_w = _one_hot_weights(best, w)
    sft_loss = weighted_mean(-logp, best_w)

    h = logp - ref_logp
    margin = _chosen(h, best) - _chosen(h, worst)
    best_reward, worst_reward = _chosen(rewards, best), _chosen(rewards, worst)
    pair_w = _chosen(w, best) * _chosen(w, worst) * (best_reward > worst_reward)
    ipo_loss = weighted_mean(jnp.square(margin - 0.5 / beta), pair_w)

    loss = alpha * sft_loss + (1.0 - alpha) * ipo_loss
    metrics = {
        "loss": loss,
        "sft_loss": sft_loss,
        "ipo_loss": ipo_loss,
        "margin": weighted_mean(jax.lax.stop_gradient(margin), pair_w),
        "best_reward_mean": weighted_mean(best_reward, _chosen(w, best)),
        "worst_reward_mean": weighted_mean(worst_reward, _chosen(w, worst)),
    }
    return loss, metrics
