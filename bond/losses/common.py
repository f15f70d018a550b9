"""Shared pieces of every loss: shape checks, weighted means and leave-one-out baselines.

Groups are `[B, S]`: B prompts, S samples per prompt. Optional `weights [B, S]` are non-negative;
they serve padding masks (weight 0 removes a sample) and exact tests (weights = probabilities turn
a weighted mean over the whole support into an exact expectation). A pair's weight is w_i * w_j.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


def check_rank(name: str, x: ArrayLike, rank: int, fn: str) -> jax.Array:
    """Returns `x` as an array after checking it has `rank` dimensions."""
    x = jnp.asarray(x)
    if x.ndim != rank:
        layout = {1: "[B]", 2: "[B, S] (B prompts, S samples per prompt)", 3: "[B, S, S]"}.get(rank, f"rank {rank}")
        raise ValueError(f"{fn}: `{name}` must have shape {layout} but has shape {x.shape}.")
    return x


def check_same_shape(fn: str, **arrays: ArrayLike) -> tuple[int, ...]:
    """Checks that every named array has the same shape; returns that shape."""
    shapes = {name: jnp.shape(a) for name, a in arrays.items()}
    first_name, first_shape = next(iter(shapes.items()))
    for name, shape in shapes.items():
        if shape != first_shape:
            raise ValueError(
                f"{fn}: `{name}` has shape {shape} but `{first_name}` has shape {first_shape}; "
                f"all per-sample inputs must share one shape."
            )
    return first_shape


def group_weights(fn: str, weights: Optional[ArrayLike], shape: tuple[int, ...]) -> jax.Array:
    """Returns the sample weights, all ones when `weights` is None, after checking the shape."""
    if weights is None:
        return jnp.ones(shape, jnp.float32)
    weights = jnp.asarray(weights)
    if weights.shape != shape:
        raise ValueError(
            f"{fn}: `weights` has shape {weights.shape} but the samples have shape {shape}; "
            f"pass one non-negative weight per sample."
        )
    return weights


def weighted_mean(x: ArrayLike, weights: ArrayLike) -> jax.Array:
    """Σ w·x / Σ w over all entries; 0 when every weight is 0 (an all-padding batch)."""
    x, weights = jnp.asarray(x), jnp.asarray(weights)
    total = jnp.sum(weights)
    safe_total = jnp.where(total > 0, total, 1.0)
    # `where` keeps an infinite x at weight 0 from turning the sum into NaN.
    return jnp.sum(jnp.where(weights > 0, weights * x, 0.0)) / safe_total


def leave_one_out_mean(x: ArrayLike, weights: ArrayLike, axis: int | tuple[int, ...] = -1) -> jax.Array:
    """b_i = Σ_{j≠i} w_j x_j / Σ_{j≠i} w_j over `axis`, the baseline of RLOO (Kool et al. 2019).

    Independent of sample i, so subtracting it from i's return keeps a REINFORCE estimate unbiased.
    Where no other sample has weight (a group of one), the baseline is 0.
    """
    x, weights = jnp.asarray(x), jnp.asarray(weights)
    wx = jnp.where(weights > 0, weights * x, 0.0)
    others_sum = jnp.sum(wx, axis=axis, keepdims=True) - wx
    others_weight = jnp.sum(weights, axis=axis, keepdims=True) - weights
    # Guard against round-off leaving a tiny positive weight for "no other sample".
    has_others = others_weight > 1e-6 * jnp.maximum(jnp.sum(weights, axis=axis, keepdims=True), 1e-30)
    return jnp.where(has_others, others_sum / jnp.where(has_others, others_weight, 1.0), 0.0)


def reinforce_surrogate(logp: ArrayLike, cost: ArrayLike, weights: ArrayLike, baseline: ArrayLike) -> jax.Array:
    """Weighted mean of stop_gradient(cost − baseline) · logp.

    Its gradient is the score-function (REINFORCE, Williams 1992) estimate of ∇ E_π[cost]
    when cost does not depend on θ, or of E_π[∇log π · cost] when it does; a baseline
    independent of the sample leaves the estimate unbiased.
    """
    advantage = jax.lax.stop_gradient(jnp.asarray(cost) - jnp.asarray(baseline))
    return weighted_mean(advantage * jnp.asarray(logp), weights)


Metrics = dict[str, jax.Array]


def mask_unweighted(weights: jax.Array, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """Sets every entry of weight 0 to 0, so padding holding inf or NaN cannot reach a loss or its gradient.

    A `jnp.where` further down is not enough: its gradient multiplies the zero cotangent of the
    masked branch by the masked value, and 0·inf = NaN.
    """
    keep = weights > 0
    return tuple(jnp.where(keep, a, jnp.zeros((), a.dtype)) for a in arrays)


def check_in_range(
    fn: str,
    name: str,
    value: ArrayLike,
    *,
    minimum: float,
    maximum: float = np.inf,
    strict_minimum: bool = False,
) -> None:
    """Raises ValueError when a concrete hyperparameter lies outside [minimum, maximum] (or (minimum, maximum]).

    A traced value (a swept hyperparameter inside jit) cannot be inspected: check it where the
    config is built.
    """
    try:
        v = np.asarray(value, dtype=np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    above = v > minimum if strict_minimum else v >= minimum
    if not (np.all(above) and np.all(v <= maximum) and np.all(np.isfinite(v))):
        low = "(" if strict_minimum else "["
        high = f"{maximum}]" if np.isfinite(maximum) else "inf)"
        raise ValueError(f"{fn}: `{name}` must be finite and in {low}{minimum}, {high}, got {value}.")


def weighted_std(x: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted standard deviation √(Σ w (x − x̄)² / Σ w) over all entries."""
    mean = weighted_mean(x, weights)
    return jnp.sqrt(weighted_mean(jnp.square(x - mean), weights))
