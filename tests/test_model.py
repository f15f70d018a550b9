"""Tests of bond.models.transformer: shapes, parameter count, axis names, KV cache, padding, log-probs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from bond.models import (
    Transformer,
    TransformerConfig,
    config_from_gpt2,
    count_params,
    init_cache,
    init_params,
    logits,
    param_logical_axes,
    positions_from_mask,
    sequence_logprobs,
)

TINY = TransformerConfig(vocab_size=16, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_len=16)

# The shared workload's model (../shared/bench/workload.py, "bon_gpt2_tiny_v1").
GPT2_WORKLOAD = {
    "n_layer": 4, "n_embd": 256, "n_head": 4, "n_inner": 1024, "vocab_size": 512, "n_positions": 128,
    "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
}
LOGICAL_NAMES = {"vocab", "embed", "mlp", "heads", "kv", "position"}


@pytest.fixture(scope="module")
def params():
    return init_params(TINY, jax.random.key(0))


def _left_padded_batch():
    """3 rows of length 10: prompt of 5 with 0, 2 and 4 left pads, then 5 response tokens."""
    tokens = np.array(jax.random.randint(jax.random.key(1), (3, 10), 1, TINY.vocab_size))
    mask = np.ones((3, 10), np.int32)
    for row, pads in enumerate((0, 2, 4)):
        mask[row, :pads] = 0
        tokens[row, :pads] = 0
    return jnp.asarray(tokens), jnp.asarray(mask)


def test_workload_gpt2_parameter_count():
    # HF GPT2LMHeadModel count with the tied lm_head counted once (workload n_params).
    config = config_from_gpt2(GPT2_WORKLOAD)
    shapes = jax.eval_shape(lambda key: init_params(config, key), jax.random.key(0))
    assert count_params(shapes) == 3_323_392
    untied = config_from_gpt2(GPT2_WORKLOAD, tie_embeddings=False)
    shapes = jax.eval_shape(lambda key: init_params(untied, key), jax.random.key(0))
    assert count_params(shapes) == 3_323_392 + 512 * 256


def test_param_logical_axes_name_every_axis(params):
    axes = param_logical_axes(TINY)
    assert jax.tree_util.tree_structure(axes) == jax.tree_util.tree_structure(params)
    for spec, leaf in zip(jax.tree_util.tree_leaves(axes), jax.tree_util.tree_leaves(params)):
        assert isinstance(spec, PartitionSpec)
        assert len(spec) == leaf.ndim
        assert set(spec) <= LOGICAL_NAMES
    assert axes["wte"]["embedding"] == PartitionSpec("vocab", "embed")
    assert axes["wpe"]["embedding"] == PartitionSpec("position", "embed")
    assert axes["blocks_0"]["attn"]["query"]["kernel"] == PartitionSpec("embed", "heads", "kv")
    assert axes["blocks_0"]["attn"]["out"]["kernel"] == PartitionSpec("heads", "kv", "embed")
    assert axes["blocks_1"]["mlp"]["fc_in"]["kernel"] == PartitionSpec("embed", "mlp")


def test_positions_from_mask():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]])


def test_left_padding_does_not_change_real_logits(params):
    sequence = jax.random.randint(jax.random.key(2), (10,), 1, TINY.vocab_size)
    tokens = jnp.stack([sequence, jnp.concatenate([jnp.zeros(3, jnp.int32), sequence[:7]]), sequence])
    mask = jnp.ones((3, 10), jnp.int32).at[1, :3].set(0)
    out = logits(TINY, params, tokens, mask)
    np.testing.assert_allclose(out[1, 3:], out[0, :7], atol=1e-5)


def test_cached_decoding_matches_full_forward(params):
    tokens, mask = _left_padded_batch()
    prompt_len, length = 5, tokens.shape[1]
    full = logits(TINY, params, tokens, mask)
    apply, positions = jax.jit(Transformer(TINY).apply), positions_from_mask(mask)
    cache = init_cache(TINY, 3, length)
    prefill, cache = apply({"params": params}, tokens[:, :prompt_len], positions[:, :prompt_len], mask, cache, 0)
    real = np.asarray(mask[:, :prompt_len], bool)
    np.testing.assert_allclose(np.asarray(prefill)[real], np.asarray(full[:, :prompt_len])[real], atol=1e-5)
    for t in range(prompt_len, length):
        step, cache = apply({"params": params}, tokens[:, t:t + 1], positions[:, t:t + 1], mask, cache, t)
        np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5)


def test_logits_are_float32_with_bfloat16_compute():
    config = TransformerConfig(vocab_size=16, num_layers=1, d_model=32, num_heads=2, d_ff=64, max_len=8,
                               dtype=jnp.bfloat16)
    out = jax.eval_shape(lambda key: logits(config, init_params(config, key), jnp.ones((2, 4), jnp.int32)),
                         jax.random.key(0))
    assert out.dtype == jnp.float32 and out.shape == (2, 4, 16)


def test_sequence_logprobs_match_hand_computation(params):
    tokens, mask = _left_padded_batch()
    response_mask = np.zeros(tokens.shape, np.float32)
    response_mask[:, 5:9] = 1.0  # the last response token is deliberately not counted
    temperature = 0.7
    token_lp, seq_lp = sequence_logprobs(params, tokens, response_mask, model=TINY, attention_mask=mask,
                                         temperature=temperature)
    log_softmax = np.asarray(jax.nn.log_softmax(logits(TINY, params, tokens, mask) / temperature, axis=-1))
    expected = np.zeros(tokens.shape, np.float32)
    for b in range(3):
        for t in range(5, 9):
            expected[b, t] = log_softmax[b, t - 1, int(tokens[b, t])]
    np.testing.assert_allclose(token_lp, expected, atol=1e-5)
    np.testing.assert_allclose(seq_lp, expected.sum(axis=1), atol=1e-5)

    # Extra leading axes are flattened and restored.
    grouped_lp, grouped_seq = sequence_logprobs(params, tokens[:, None], response_mask[:, None], model=TINY,
                                                attention_mask=mask[:, None], temperature=temperature)
    assert grouped_lp.shape == (3, 1, 10) and grouped_seq.shape == (3, 1)
    np.testing.assert_allclose(grouped_seq[:, 0], expected.sum(axis=1), atol=1e-5)


def test_bad_inputs_raise_value_error(params):
    with pytest.raises(ValueError, match="num_heads"):
        TransformerConfig(vocab_size=16, num_layers=1, d_model=30, num_heads=4, d_ff=8, max_len=8)
    with pytest.raises(ValueError, match="activation"):
        TransformerConfig(vocab_size=16, num_layers=1, d_model=32, num_heads=4, d_ff=8, max_len=8, activation="swish")
    with pytest.raises(ValueError, match="max_len"):
        logits(TINY, params, jnp.ones((1, TINY.max_len + 1), jnp.int32))
    with pytest.raises(ValueError, match="attention_mask"):
        logits(TINY, params, jnp.ones((2, 4), jnp.int32), jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="response_mask"):
        sequence_logprobs(params, jnp.ones((2, 4), jnp.int32), jnp.ones((2, 3)), model=TINY)
