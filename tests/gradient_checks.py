"""Monte-Carlo checks of gradient estimators against exact gradients.

An estimator ĝ(θ; samples) is checked on `num_batches` independent batches drawn with a fixed
seed. With per-batch estimates g_1..g_n, the mean's standard error per component is
se = std(g_k) / sqrt(n). Each component must satisfy |mean − exact| ≤ z·se + atol; with z = 5
a correct estimator fails one of d components with probability below d·6e-7 (normal
approximation, which the central limit theorem makes good at n ≥ 100).
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

Z_SCORE = 5.0


def mc_gradient_stats(
    estimate: Callable[[jax.Array], jax.Array], key: jax.Array, num_batches: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error of `estimate(key_k)` (a flat gradient vector) over independent keys."""
    keys = jax.random.split(key, num_batches)
    grads = np.asarray(jax.jit(jax.vmap(estimate))(keys), dtype=np.float64)
    grads = grads.reshape(num_batches, -1)
    return grads.mean(axis=0), grads.std(axis=0, ddof=1) / np.sqrt(num_batches)


def assert_mc_gradient_matches(
    estimate: Callable[[jax.Array], jax.Array],
    exact: np.ndarray,
    key: jax.Array,
    num_batches: int = 2000,
    atol: float = 1e-6,
) -> np.ndarray:
    """Asserts the Monte-Carlo mean of `estimate` matches `exact` within Z_SCORE standard errors.

    Returns the standard errors so that a caller can also check they are small enough for the
    test to have power (a test whose tolerance exceeds the signal could not fail).
    """
    mean, se = mc_gradient_stats(estimate, key, num_batches)
    exact = np.asarray(exact, dtype=np.float64).reshape(-1)
    error = np.abs(mean - exact)
    bound = Z_SCORE * se + atol
    assert np.all(error <= bound), (
        f"Monte-Carlo gradient differs from the exact gradient:\n mean  {mean}\n exact {exact}\n"
        f" |err| {error}\n bound {bound}"
    )
    return se
