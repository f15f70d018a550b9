"""Float32 master weights for a bfloat16 model (bond/step.py): the state keeps the policy and the
EMA anchor in float32, the model computes with `compute_params` of them, and the Adam and EMA
updates are float32, so updates far below a bfloat16 step (lr 3e-6, η 0.02) are not lost.

Each test also runs the old rule (updates written back into bfloat16 parameters) on the same
inputs and shows that it fails the same check: the check can fail.
"""

import dataclasses
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bond.checkpoint import Checkpointer, abstract_like
from bond.models import TransformerConfig, init_params, sequence_logprobs
from bond.step import anchor_update, as_float32, compute_params, make_optimizer, master_copy, optimizer_update

# A Gemma-shaped tiny model (RMSNorm with unit offset, rotary positions, gated MLP, no biases,
# scaled embeddings) stored and computed in bfloat16, as the pretrained Gemma configs are.
BF16 = TransformerConfig(
    vocab_size=16, num_layers=1, d_model=32, num_heads=4, d_ff=64, max_len=8, dtype=jnp.bfloat16,
    param_dtype=jnp.bfloat16, norm="rms_norm", norm_unit_offset=True, position_embedding="rope", gated_mlp=True,
    qkv_bias=False, out_bias=False, mlp_bias=False, scale_embeddings=True,
)
# Float32 training of the same model: float32 parameters, the same bfloat16 compute.
F32_WEIGHTS = dataclasses.replace(BF16, param_dtype=jnp.float32)
LEARNING_RATE, STEPS = 3e-6, 100
TOKENS = jax.random.randint(jax.random.key(1), (4, 8), 0, 16)
MASK = jnp.ones((4, 8)).at[:, 0].set(0)


def nll(model: TransformerConfig, params) -> jax.Array:
    """A fixed synthetic loss: the mean negative log-likelihood of fixed token sequences."""
    return -jnp.mean(sequence_logprobs(params, TOKENS, MASK, model=model)[1])


def adam_steps(model: TransformerConfig, params, rule: str):
    """STEPS Adam steps of `nll` at lr 3e-6 from `params`.

    rule 'master': float32 master weights, the gradient taken at their compute copy (bond/step.py);
    'float32': float32 parameters throughout; 'old': the update written back into the bfloat16
    parameters, (θ.astype(f32) − lr·u).astype(bf16), as the step did before master weights.
    """
    optimizer = make_optimizer(ml_collections.ConfigDict(dict(grad_clip=1.0)))
    hp = {"learning_rate": jnp.float32(LEARNING_RATE), "lr_scale": jnp.float32(1.0)}
    setup = types.SimpleNamespace(model=model)

    def step(carry, _):
        p, opt_state = carry
        grads = jax.grad(lambda q: nll(model, q))(compute_params(setup, p) if rule == "master" else p)
        new, opt_state = optimizer_update(optimizer, p, opt_state, grads, hp)
        if rule == "old":
            new = jax.tree.map(lambda n, q: n.astype(q.dtype), new, p)
        return (new, opt_state), None

    run = jax.jit(lambda p0: jax.lax.scan(step, (p0, optimizer.init(as_float32(p0))), None, length=STEPS)[0][0])
    return run(params)


def relative_difference(moved, expected, start) -> float:
    """‖(moved − start) − (expected − start)‖ / ‖expected − start‖ over every leaf, in float64."""
    leaves = lambda tree: [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]
    delta = np.concatenate([m - s for m, s in zip(leaves(moved), leaves(start))])
    want = np.concatenate([e - s for e, s in zip(leaves(expected), leaves(start))])
    return float(np.linalg.norm(delta - want) / np.linalg.norm(want))


def test_master_weights_move_a_bfloat16_model_as_float32_training_does():
    reference = init_params(BF16, jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(reference)} == {jnp.dtype(jnp.bfloat16)}
    start = as_float32(reference)
    want = adam_steps(F32_WEIGHTS, master_copy(reference), "float32")
    master = adam_steps(BF16, master_copy(reference), "master")
    old = adam_steps(BF16, reference, "old")
    assert {x.dtype for x in jax.tree.leaves(master)} == {jnp.dtype(jnp.float32)}
    assert max(float(jnp.max(jnp.abs(w - s))) for w, s in zip(jax.tree.leaves(want), jax.tree.leaves(start))) > 0
    assert relative_difference(master, want, start) < 0.01
    # The old rule rounds most updates (about 3e-6 against a bfloat16 step of about 1e-4) to nothing.
    assert relative_difference(old, want, start) > 0.5


def test_master_weights_ema_anchor_accumulates_small_updates():
    eta, steps = 0.02, 100
    anchor0 = master_copy(init_params(BF16, jax.random.key(0)))
    # A policy a few learning-rate steps away: each EMA step moves the anchor by η·1e-4 = 2e-6.
    noise = jax.tree.map(lambda x: jnp.sign(jax.random.normal(jax.random.key(2), x.shape)), anchor0)
    policy = jax.tree.map(lambda a, n: a + 1e-4 * n, anchor0, noise)
    hp = {"anchor_eta": jnp.float32(eta)}

    def ema(anchor, rounded: bool):
        def body(a, _):
            new = anchor_update("ema", a, policy, jnp.int32(0), hp, 1)
            return (jax.tree.map(lambda x: x.astype(jnp.bfloat16), new) if rounded else new), None
        return jax.jit(lambda a: jax.lax.scan(body, a, None, length=steps)[0])(anchor)

    # Closed form: a_t = θ + (a_0 − θ)(1 − η)^t, in float64.
    decay = (1 - eta) ** steps
    f64 = lambda x: np.asarray(x, np.float64)
    exact = jax.tree.map(lambda a, p: f64(p) + (f64(a) - f64(p)) * decay, anchor0, policy)
    master = ema(anchor0, rounded=False)
    old = ema(jax.tree.map(lambda x: x.astype(jnp.bfloat16), anchor0), rounded=True)  # the anchor stored in bfloat16
    assert relative_difference(master, exact, anchor0) < 0.01
    assert relative_difference(old, exact, anchor0) > 0.5


def test_master_weights_compute_copy_is_the_model_dtype_and_float32_models_are_untouched():
    bf16 = types.SimpleNamespace(model=BF16)
    master = master_copy(init_params(BF16, jax.random.key(0)))
    assert {x.dtype for x in jax.tree.leaves(compute_params(bf16, master))} == {jnp.dtype(jnp.bfloat16)}
    f32 = types.SimpleNamespace(model=dataclasses.replace(BF16, dtype=jnp.float32, param_dtype=jnp.float32))
    assert all(a is b for a, b in zip(jax.tree.leaves(compute_params(f32, master)), jax.tree.leaves(master)))
    assert compute_params(bf16, None) is None  # a run without an anchor


def test_master_weights_restore_a_bfloat16_checkpoint_as_float32(tmp_path):
    """A checkpoint saved when the state held bfloat16 parameters restores onto the float32 master
    target: verified against its saved bytes, then cast (exactly: every bfloat16 is a float32)."""
    old_params = init_params(BF16, jax.random.key(0))
    with Checkpointer(tmp_path, keep=2) as checkpointer:
        checkpointer.save(1, {"params": old_params})
        target = abstract_like({"params": master_copy(old_params)})
        restored, _ = checkpointer.restore(abstract_state=target)
    assert {x.dtype for x in jax.tree.leaves(restored)} == {jnp.dtype(jnp.float32)}
    for a, b in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(old_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b, np.float32))
