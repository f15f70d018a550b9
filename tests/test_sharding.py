"""Tests for bond/sharding.py on 8 fake CPU devices (tests/conftest.py sets them up).

Sharding must not change results: a forward pass, a sampler call and an Adam step on meshes
(8,1,1), (2,2,2) and (1,4,2), traced under the mesh (activations split over the batch axes), equal
the one-device results within 1e-5 (float summation order is all that differs), and the sampler
draws the very same tokens from the same key. On an FSDP mesh (1,8,1) the real train step keeps
1/8 of the batch's activations per device and equals the one-device step, and the sampler's
decode loop gathers no weights when they are gathered before it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from bond import hlo, models, sharding
from bond.context import build_context
from bond.sampling import sample
from test_population import tiny

# Every sharded dimension divides 2 and 4: vocab 16, embed 16, mlp 32, heads 4.
CONFIG = models.TransformerConfig(vocab_size=16, num_layers=1, d_model=16, num_heads=4, d_ff=32, max_len=12)
BATCH, PROMPT_LEN, NEW_TOKENS = 8, 4, 4
MESH_SHAPES = [(8, 1, 1), (2, 2, 2), (1, 4, 2)]
# Adam divides by sqrt(v) + eps: a gradient that is 0 in exact arithmetic (e.g. of a key bias,
# softmax is shift-invariant) is ~1e-9 rounding noise whose sign depends on the summation order,
# and eps = 1e-8 would turn it into a full step of size lr. eps = 1e-4 keeps such steps < 1e-7.
OPTIMIZER = optax.adam(1e-2, eps=1e-4)


# Small programs compile about 2.5x faster on CPU at LLVM -O0; the arithmetic is the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, CONFIG.vocab_size, size=(BATCH, PROMPT_LEN + NEW_TOKENS)).astype(np.int32)
    attention_mask = np.ones_like(tokens)
    attention_mask[1, :2] = 0  # a left-padded prompt
    tokens[1, :2] = 0
    response_mask = np.zeros(tokens.shape, np.float32)
    response_mask[:, PROMPT_LEN:] = 1.0
    return {"tokens": tokens, "attention_mask": attention_mask, "response_mask": response_mask}


def _loss(params, batch):
    _, seq_logprob = models.sequence_logprobs(
        params, batch["tokens"], batch["response_mask"], model=CONFIG, attention_mask=batch["attention_mask"]
    )
    return -jnp.mean(seq_logprob)


def _forward(params, batch):
    return models.logits(CONFIG, params, batch["tokens"], batch["attention_mask"])


def _forward_sample_and_step(params, opt_state, batch):
    """The three computations compared, in one program (one compile per mesh)."""
    logits = _forward(params, batch)
    samples = sample(
        CONFIG, params, batch["tokens"][:, :PROMPT_LEN], batch["attention_mask"][:, :PROMPT_LEN],
        jax.random.key(7), num_samples=2, max_new_tokens=NEW_TOKENS,
    )
    loss, grads = jax.value_and_grad(_loss)(params, batch)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
    return logits, samples, optax.apply_updates(params, updates), opt_state, loss


@pytest.fixture(scope="module")
def host_params():
    """N(0, 0.1^2) parameters of CONFIG's shapes (numpy: no init program to compile)."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(models.init_params, CONFIG, jax.random.key(0))
    return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def reference(host_params):
    """The unsharded results on one device (the default device 0)."""
    step = jax.jit(_forward_sample_and_step, compiler_options=FAST_COMPILE)
    return jax.device_get(step(host_params, OPTIMIZER.init(host_params), _batch()))


def _shard(mesh, host_params):
    """Params, optimizer state and batch laid out on `mesh`, with their shardings."""
    param_sh = sharding.param_shardings(host_params, models.param_logical_axes(CONFIG), mesh)
    params = sharding.device_put_global(host_params, param_sh)
    opt_sh = sharding.shardings_like_params(jax.eval_shape(OPTIMIZER.init, params), params, param_sh, mesh)
    opt_state = jax.jit(OPTIMIZER.init, out_shardings=opt_sh)(params)
    sharding.check_batch_divides(BATCH, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    batch = sharding.host_local_to_global(_batch(), batch_sh)
    return (params, opt_state, batch), (param_sh, opt_sh, batch_sh)


@pytest.mark.parametrize("mesh_shape", MESH_SHAPES)
def test_sharded_forward_sampler_and_step_equal_one_device(mesh_shape, host_params, reference):
    mesh = sharding.make_mesh(mesh_shape)
    assert dict(mesh.shape) == dict(zip(sharding.MESH_AXES, mesh_shape))
    (params, opt_state, batch), (param_sh, opt_sh, batch_sh) = _shard(mesh, host_params)
    # The layout really is distributed: the batch is split, and with fsdp or tensor > 1 so are params.
    assert not batch["tokens"].sharding.is_fully_replicated
    params_split = any(not s.is_fully_replicated for s in jax.tree.leaves(param_sh))
    assert params_split == (mesh_shape[1] * mesh_shape[2] > 1)

    step = sharding.jit_sharded(
        _forward_sample_and_step,
        in_shardings=(param_sh, opt_sh, batch_sh),
        out_shardings=(batch_sh, batch_sh, param_sh, opt_sh, sharding.replicated(mesh)),
        donate_argnums=(0, 1),
        compiler_options=FAST_COMPILE,
        activation_mesh=mesh,  # activations split over the batch axes, the sampler's weights gathered
    )
    logits, samples, new_params, new_opt_state, loss = step(params, opt_state, batch)
    ref_logits, ref_samples, ref_params, ref_opt_state, ref_loss = reference

    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(samples.tokens, ref_samples.tokens)  # same key, same tokens
    np.testing.assert_allclose(samples.logprobs, ref_samples.logprobs, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(new_params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(new_opt_state), jax.tree.leaves(ref_opt_state)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert jax.tree.map(lambda x: x.sharding, new_params) == param_sh
    assert params["wte"]["embedding"].is_deleted()  # donated


def test_one_device_mesh_runs_unchanged(host_params, reference):
    mesh = sharding.make_mesh((-1, 1, 1), devices=jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    (params, _, batch), (param_sh, _, batch_sh) = _shard(mesh, host_params)
    forward = sharding.jit_sharded(
        _forward, in_shardings=(param_sh, batch_sh), out_shardings=batch_sh, compiler_options=FAST_COMPILE
    )
    np.testing.assert_allclose(forward(params, batch), reference[0], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Mesh construction and errors


def test_mesh_shape_minus_one_takes_the_remaining_devices():
    assert sharding.resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert sharding.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
    assert sharding.resolve_mesh_shape((1, 1, 1), 1) == (1, 1, 1)


@pytest.mark.parametrize("mesh_shape", [(3, 1, 1), (-1, 3, 1), (2, 2, 4), (-1, -1, 1), (0, 8, 1), (8, 1)])
def test_misfitting_mesh_names_field_and_device_count(mesh_shape):
    with pytest.raises(ValueError, match="mesh_shape") as error:
        sharding.make_mesh(mesh_shape)
    if len(mesh_shape) == 3 and mesh_shape.count(-1) < 2 and 0 not in mesh_shape:
        assert "8" in str(error.value)


def test_non_dividing_batch_names_the_field():
    mesh = sharding.make_mesh((2, 2, 2))
    sharding.check_batch_divides(12, mesh, field="prompts_per_step")  # 12 = 3 * (data 2 x fsdp 2)
    with pytest.raises(ValueError, match=r"prompts_per_step=6 .* 4 batch shards"):
        sharding.check_batch_divides(6, mesh, field="prompts_per_step")


# ---------------------------------------------------------------------------------------------
# Rules


def test_logical_specs_follow_the_rules():
    mesh = sharding.make_mesh((2, 2, 2))
    def to_mesh(*names, shape=None):
        return sharding.logical_to_mesh_spec(PartitionSpec(*names), mesh, shape=shape)

    assert to_mesh("embed", "mlp") == PartitionSpec("fsdp", "tensor")
    assert to_mesh("embed", "heads", "kv") == PartitionSpec("fsdp", "tensor", None)
    assert to_mesh("batch", None) == PartitionSpec(("data", "fsdp"), None)
    assert to_mesh("position", "embed") == PartitionSpec(None, "fsdp")
    # A mesh axis splits one dimension only: the second 'embed' stays whole.
    assert to_mesh("embed", "embed") == PartitionSpec("fsdp", None)
    # A dimension the axis does not divide stays whole (vocabulary 9 on a tensor axis of 2).
    assert to_mesh("vocab", "embed", shape=(9, 16)) == PartitionSpec(None, "fsdp")
    # Axes of size 1 split nothing and are left out.
    flat = sharding.make_mesh((8, 1, 1))
    assert sharding.logical_to_mesh_spec(PartitionSpec("embed", "mlp"), flat) == PartitionSpec(None, None)
    assert sharding.batch_sharding(flat).spec == PartitionSpec("data")
    with pytest.raises(ValueError, match="'experts'"):
        to_mesh("experts")


def test_rules_are_data():
    mesh = sharding.make_mesh((2, 2, 2))
    rules = (("batch", "data"), ("embed", "tensor"), ("mlp", None))
    spec = sharding.logical_to_mesh_spec(PartitionSpec("embed", "mlp"), mesh, rules)
    assert spec == PartitionSpec("tensor", None)
    assert sharding.num_batch_shards(mesh, rules) == 2


def test_optimizer_state_mirrors_param_shardings(host_params):
    mesh = sharding.make_mesh((2, 2, 2))
    params = host_params
    param_sh = sharding.param_shardings(params, models.param_logical_axes(CONFIG), mesh)
    state = jax.eval_shape(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)).init, params)
    state_sh = sharding.shardings_like_params(state, params, param_sh, mesh)
    adam = state_sh[1][0]
    assert adam.mu == param_sh and adam.nu == param_sh
    assert adam.count == NamedSharding(mesh, PartitionSpec())
    assert param_sh["wte"]["embedding"].spec == PartitionSpec("tensor", "fsdp")


# ---------------------------------------------------------------------------------------------
# Batch-parallel FSDP: activations split over the batch, weights gathered for compute


def _leading_dims(hlo_text: str, last_dim: int) -> set[int]:
    """Leading dimensions of the rank-3 arrays of a per-device HLO program whose last dimension is
    `last_dim`: with last_dim = d_ff (no weight has rank 3 and last dimension d_ff), the rows of the
    MLP activations [rows, length, d_ff] each device holds."""
    import re

    return {int(m) for m in re.findall(rf"\[(\d+),\d+,{last_dim}\]", hlo_text)}


def test_fsdp_step_splits_activations_over_the_batch_and_equals_one_device(cache_dir):
    """BOND's real step on mesh (1, 8, 1): every device holds 1/8 of the rows of each MLP activation
    (without the constraints XLA keeps all of them on every device), the per-prompt reference
    samples are split over the devices too, and one step gives the one-device step's parameters and
    metrics."""
    runs = {n: build_context(tiny(cache_dir, "bond", num_devices=n, mesh_shape=(1, n, 1)), log=lambda _: None)
            for n in (1, 8)}
    fsdp = runs[8]
    inputs = {n: (run.state, run.batch(0), run.fixed, run.traced) for n, run in runs.items()}
    hlo = fsdp.step.lower(*inputs[8]).compile().as_text()
    # the loss's one differentiated log-prob pass: the policy's samples and the Best-of-N sample, joined
    rows = fsdp.config.batch_size * (fsdp.setup.plan.policy + 1)
    per_device = _leading_dims(hlo, fsdp.config.model.d_ff)
    assert per_device and max(per_device) == rows // 8, per_device
    cache = fsdp.traced.reference_samples.tokens
    assert cache.addressable_shards[0].data.shape[0] == cache.shape[0] // 8

    (state, metrics), (state1, metrics1) = (runs[n].step(*inputs[n]) for n in (8, 1))
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(state1.params)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert sorted(metrics) == sorted(metrics1)
    for key in metrics1:
        np.testing.assert_allclose(metrics[key], metrics1[key], atol=1e-5, rtol=0, err_msg=key)


@pytest.mark.parametrize("layout", ["fsdp", "gathered"])
def test_fsdp_decode_loop_gathers_weights_only_in_the_fsdp_layout(layout, host_params):
    """The sampler on mesh (1, 8, 1), rows split over the batch: with its weights as trained ('fsdp',
    split on their contracting dimension) every token's matmuls must move weights or activations
    between devices inside the decode loop (at scale XLA gathers the weights: 4.78 GB per token for
    Gemma-2B on 8 chips; at this size it moves the activations, 385 bytes per token); gathered once
    before the loop ('gathered'), the loop collects only whether every row has ended (< 16 bytes)."""
    mesh = sharding.make_mesh((1, 8, 1))
    (params, _, batch), (param_sh, _, batch_sh) = _shard(mesh, host_params)

    def draw(params, batch):
        return sample(CONFIG, params, batch["tokens"][:, :PROMPT_LEN], batch["attention_mask"][:, :PROMPT_LEN],
                      jax.random.key(7), num_samples=2, max_new_tokens=NEW_TOKENS, decode_weights=layout)

    program = sharding.jit_sharded(draw, in_shardings=(param_sh, batch_sh), out_shardings=batch_sh,
                                   compiler_options=FAST_COMPILE, activation_mesh=mesh)
    per_token = hlo.loop_collective_bytes(program.lower(params, batch).compile().as_text())
    if layout == "fsdp":
        assert per_token > 16, per_token
    else:
        assert per_token < 16, per_token
