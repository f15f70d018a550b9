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


def _grouped_samples(config, prompts=3, samples=4, prompt_len=5, response_len=5):
    """[prompts, samples, P + L] rows: left-padded prompts (0, 2 and 4 pads) shared by their samples,
    responses that end early (EOS then masked padding) in some rows."""
    keys = jax.random.split(jax.random.key(3), 2)
    prompt = np.array(jax.random.randint(keys[0], (prompts, prompt_len), 1, config.vocab_size))
    prompt_mask = np.ones((prompts, prompt_len), np.int32)
    for row in range(prompts):
        pads = (2 * row) % prompt_len
        prompt[row, :pads], prompt_mask[row, :pads] = 0, 0
    response = np.array(jax.random.randint(keys[1], (prompts, samples, response_len), 1, config.vocab_size))
    response_mask = np.ones(response.shape, np.int32)
    response[0, 1, 2], response[0, 1, 3:], response_mask[0, 1, 3:] = 0, 0, 0  # EOS at 2, then padding
    response[2, 3, 0], response[2, 3, 1:], response_mask[2, 3, 1:] = 0, 0, 0  # EOS first
    tile = lambda x: np.repeat(x[:, None], samples, axis=1)
    tokens = np.concatenate([tile(prompt), response], axis=-1)
    mask = np.concatenate([tile(prompt_mask), response_mask], axis=-1)
    scored = np.concatenate([np.zeros_like(tile(prompt_mask)), response_mask], axis=-1).astype(np.float32)
    return jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(scored)


@pytest.mark.parametrize("config", [
    TINY,
    TransformerConfig(vocab_size=16, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, max_len=16,
                      norm="rms_norm", position_embedding="rope", gated_mlp=True, activation="silu",
                      tie_embeddings=False),
], ids=["gpt2", "llama"])
def test_shared_prompt_logprobs_and_gradients_match_full_pass(config):
    params = init_params(config, jax.random.key(4))
    tokens, mask, scored = _grouped_samples(config)

    def total(p, shared):
        lp, seq = sequence_logprobs(p, tokens, scored, model=config, attention_mask=mask, temperature=0.8,
                                    shared_prompt_len=shared)
        return jnp.sum(seq * jnp.arange(1.0, 1.0 + seq.size).reshape(seq.shape)), lp

    (full_total, full_lp), full_grad = jax.value_and_grad(total, has_aux=True)(params, 0)
    (shared_total, shared_lp), shared_grad = jax.jit(jax.value_and_grad(total, has_aux=True), static_argnums=1)(
        params, 5)
    np.testing.assert_allclose(shared_lp, full_lp, atol=1e-5)
    assert np.all(np.asarray(shared_lp)[..., :5] == 0) and np.any(np.asarray(full_lp)[..., 5:] != 0)
    np.testing.assert_allclose(shared_total, full_total, rtol=1e-5)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(full_grad))  # float32 rounding, relative to it
    for got, want in zip(jax.tree.leaves(shared_grad), jax.tree.leaves(full_grad)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * scale)

    # One response token: the prompt's last logits score it, no response pass at all.
    short = [x[..., :6] for x in (tokens, mask, scored)]
    np.testing.assert_allclose(
        sequence_logprobs(params, short[0], short[2], model=config, attention_mask=short[1], shared_prompt_len=5)[1],
        sequence_logprobs(params, short[0], short[2], model=config, attention_mask=short[1])[1], atol=1e-5)


def test_shared_prompt_len_rejects_rows_that_do_not_share_it(params):
    tokens, mask, scored = _grouped_samples(TINY)
    with pytest.raises(ValueError, match="differ between the samples"):
        sequence_logprobs(params, tokens.at[1, 2, 4].add(1), scored, model=TINY, attention_mask=mask,
                          shared_prompt_len=5)
    with pytest.raises(ValueError, match=r"\[prompts, samples, length\]"):
        sequence_logprobs(params, tokens[0], scored[0], model=TINY, attention_mask=mask[0], shared_prompt_len=5)
    with pytest.raises(ValueError, match="shared_prompt_len must be an int"):
        sequence_logprobs(params, tokens, scored, model=TINY, attention_mask=mask, shared_prompt_len=10)


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
