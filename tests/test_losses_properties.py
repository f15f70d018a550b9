"""Property tests (hypothesis) of the distillation and WIND losses: shapes, masks, extreme inputs.

For random group shapes and log-probabilities as extreme as ±1e4: the loss and every metric are
finite scalars, the gradient with respect to the policy log-probs is finite, and a sample with
weight 0 changes nothing however its inputs change.
"""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bond.losses import bond_backward_kl, j_bond, jeffreys_bond, wind

EXTREME = 1e4


def sample_inputs(seed, b, s):
    rng = np.random.default_rng(seed)
    scale = rng.choice([1.0, 100.0, EXTREME])
    arrays = {name: jnp.asarray(rng.uniform(-scale, scale, size=(b, s)), jnp.float32) for name in ("logp", "other_logp", "third_logp", "rewards")}
    arrays["bo2_logp"] = jnp.asarray(rng.uniform(-scale, scale, size=b), jnp.float32)
    arrays["anchor_rewards"] = jnp.asarray(rng.uniform(-scale, scale, size=(b, 2)), jnp.float32)
    p = rng.uniform(size=(b, s, s))
    arrays["pref"] = jnp.asarray((p + 1.0 - np.swapaxes(p, 1, 2)) / 2.0, jnp.float32)
    return arrays


LOSSES = {
    "bond_backward_kl": lambda a, w: bond_backward_kl(a["logp"], a["other_logp"], -jnp.abs(a["third_logp"]), n=8.0, weights=w),
    "jeffreys_bond": lambda a, w: jeffreys_bond(
        a["logp"], a["other_logp"], -jnp.abs(a["third_logp"]), a["bo2_logp"], n=4.0, beta=0.5, weights=w
    ),
    "j_bond": lambda a, w: j_bond(
        a["logp"], a["other_logp"], a["rewards"], a["anchor_rewards"], a["bo2_logp"], beta=0.5, gamma=1.0, weights=w
    ),
    "wind_square": lambda a, w: wind(a["logp"], a["other_logp"], a["third_logp"], a["pref"], eta=1.0, beta=0.1, variant="square", weights=w),
    "wind_sppo": lambda a, w: wind(a["logp"], a["other_logp"], a["third_logp"], a["pref"], eta=1.0, beta=0.1, variant="sppo", weights=w),
    "wind_kl": lambda a, w: wind(a["logp"], a["other_logp"], a["third_logp"], a["pref"], eta=1.0, beta=0.1, variant="kl", weights=w),
}

shapes = st.tuples(st.integers(1, 3), st.integers(1, 4))


@settings(max_examples=12, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_finite_values_and_gradients(shape, seed):
    a = sample_inputs(seed, *shape)
    for name, loss_fn in LOSSES.items():
        loss, metrics = loss_fn(a, None)
        assert loss.shape == (), name
        assert np.isfinite(loss), name
        for key, value in metrics.items():
            assert jnp.shape(value) == () and np.isfinite(value), (name, key)
        grad = jax.grad(lambda lp: loss_fn({**a, "logp": lp}, None)[0])(a["logp"])
        assert grad.shape == a["logp"].shape and np.all(np.isfinite(grad)), name


@settings(max_examples=12, deadline=None)
@given(
    shape=shapes,
    seed=st.integers(0, 2**31 - 1),
    masked=st.integers(0, 11),
    garbage=st.sampled_from([np.nan, np.inf, -np.inf, 1e30, -3.0]),
)
def test_weight_zero_sample_changes_nothing(shape, seed, masked, garbage):
    """A sample of weight 0 holding anything (NaN, ±inf, 1e30) changes neither loss nor gradient."""
    b, s = shape
    a = sample_inputs(seed, b, s)
    row, col = divmod(masked % (b * s), s)
    weights = jnp.ones((b, s)).at[row, col].set(0.0)
    per_sample = ("logp", "other_logp", "third_logp", "rewards")
    changed = {k: (v.at[row, col].set(garbage) if k in per_sample else v) for k, v in a.items()}
    changed["pref"] = a["pref"].at[row, col, :].set(garbage).at[row, :, col].set(garbage)
    for name, loss_fn in LOSSES.items():
        if name == "j_bond" and s == 1 and b == 1:
            continue  # the only prompt masked entirely: its Best-of-2 term has weight 0 as well
        value = lambda arrays: loss_fn(arrays, weights)[0]
        grad = lambda arrays: jax.grad(lambda lp: loss_fn({**arrays, "logp": lp}, weights)[0])(arrays["logp"])
        loss_a, loss_b = value(a), value(changed)
        np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5, atol=1e-5 * (1 + abs(float(loss_a))), err_msg=name)
        grad_a, grad_b = grad(a), grad(changed)
        assert np.all(np.isfinite(grad_b)), name
        np.testing.assert_allclose(grad_a, grad_b, rtol=1e-5, atol=1e-6, err_msg=name)
        assert float(grad_b[row, col]) == 0.0, name
