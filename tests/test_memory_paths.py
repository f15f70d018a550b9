"""The model's memory paths (config.memory) against the plain path: block remat, attention through
jax.nn.dot_product_attention, vocabulary-chunked log-probs, and the sampler's last-position prefill.

Each path must give the plain path's log-probs and their gradients w.r.t. the parameters (float32,
1e-5), on left-padded prompts, padded responses, the shared-prompt (KV cache) path and grouped-query
attention with rotary positions and an untied output projection.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond.config_base import base_config
from bond.models import TransformerConfig, init_params, logits, param_logical_axes, sequence_logprobs
from bond.sampling import sample
from bond.validation import ConfigError, validate

TOL = dict(rtol=1e-5, atol=1e-5)
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # tiny programs: compile time dominates
CONFIGS = {
    # GPT-2 layout: learned positions, tied embeddings, multi-head attention.
    "gpt2": TransformerConfig(vocab_size=37, num_layers=2, d_model=16, num_heads=4, d_ff=32, max_len=16),
    # Llama layout: rotary positions, RMSNorm, SwiGLU, 4 query heads on 2 key/value heads, untied lm_head.
    "llama": TransformerConfig(
        vocab_size=37, num_layers=2, d_model=16, num_heads=4, d_ff=32, max_len=16, num_kv_heads=2,
        position_embedding="rope", norm="rms_norm", gated_mlp=True, activation="silu", tie_embeddings=False,
        qkv_bias=False, out_bias=False, mlp_bias=False,
    ),
}
PROMPT_LEN = 5


def _batch():
    """[2 prompts, 3 samples, 9 columns]: shared prompts of 5 (prompt 0 left-padded by 2), responses
    of 4, one of them padded after 2 tokens."""
    tokens = jax.random.randint(jax.random.key(1), (2, 3, 9), 1, 37)
    tokens = tokens.at[:, :, :PROMPT_LEN].set(tokens[:, :1, :PROMPT_LEN]).at[0, :, :2].set(0)
    mask = jnp.ones(tokens.shape, jnp.int32).at[0, :, :2].set(0).at[1, 1, 7:].set(0)
    response_mask = jnp.zeros(tokens.shape, jnp.float32).at[:, :, PROMPT_LEN:].set(1.0) * mask
    return tokens, mask, response_mask


@functools.lru_cache(maxsize=None)
def _params(name: str):
    return init_params(CONFIGS[name], jax.random.key(0))


def _logprobs_and_grads(config: TransformerConfig, params, *, shared: bool, vocab_chunk: int = 0):
    """Per-token log-probs at temperature 0.7 and the gradient of a weighted sum of the sequences'."""
    return _logprobs_and_grads_jit(params, *_batch(), config=config, shared=shared, vocab_chunk=vocab_chunk)


@functools.partial(
    jax.jit, static_argnames=("config", "shared", "vocab_chunk"), compiler_options=FAST_COMPILE,
)
def _logprobs_and_grads_jit(params, tokens, mask, response_mask, *, config, shared, vocab_chunk):
    weights = jnp.array([[1.0, -0.5, 2.0], [0.3, 1.5, -1.0]])

    def scalar(p):
        token_lp, seq_lp = sequence_logprobs(
            p, tokens, response_mask, model=config, attention_mask=mask, temperature=0.7,
            shared_prompt_len=PROMPT_LEN if shared else 0, vocab_chunk=vocab_chunk,
        )
        return (seq_lp * weights).sum(), token_lp

    (_, token_lp), grads = jax.value_and_grad(scalar, has_aux=True)(params)
    return token_lp, grads


@functools.lru_cache(maxsize=None)
def _plain(name: str, shared: bool):
    return _logprobs_and_grads(CONFIGS[name], _params(name), shared=shared)


def _assert_same(got, want):
    (got_lp, got_grads), (want_lp, want_grads) = got, want
    np.testing.assert_allclose(got_lp, want_lp, **TOL)
    assert jax.tree_util.tree_structure(got_grads) == jax.tree_util.tree_structure(want_grads)
    for g, w in zip(jax.tree_util.tree_leaves(got_grads), jax.tree_util.tree_leaves(want_grads)):
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, w, **TOL)


@pytest.mark.parametrize("name, policy", [("gpt2", "dots_saveable"), ("llama", "nothing_saveable")])
def test_remat_keeps_parameter_names_values_and_gradients(name, policy):
    config = dataclasses.replace(CONFIGS[name], remat=policy)
    plain_axes, remat_axes = param_logical_axes(CONFIGS[name]), param_logical_axes(config)
    assert jax.tree_util.tree_structure(remat_axes) == jax.tree_util.tree_structure(plain_axes)
    assert jax.tree_util.tree_leaves(remat_axes) == jax.tree_util.tree_leaves(plain_axes)
    assert "blocks_0" in remat_axes
    _assert_same(_logprobs_and_grads(config, _params(name), shared=True), _plain(name, True))


@functools.lru_cache(maxsize=None)
def _draw(config: TransformerConfig):
    """The sampler's output for the llama parameters: 2 left-padded prompts, 4 samples of 6 tokens each."""
    tokens, mask, _ = _batch()
    prompts, prompt_mask = tokens[:, 0, :PROMPT_LEN], mask[:, 0, :PROMPT_LEN]
    return sample(config, _params("llama"), prompts, prompt_mask, jax.random.key(3), num_samples=4, max_new_tokens=6)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_dot_product_attention_matches_einsum_with_padding_and_cache(name):
    # The shared-prompt path runs the left-padded prompts (fully masked rows at the pads) in one causal
    # pass, then the responses' queries against the prompt's KV cache.
    config = dataclasses.replace(CONFIGS[name], attention="dot_product")
    _assert_same(_logprobs_and_grads(config, _params(name), shared=True), _plain(name, True))
    if name == "llama":  # decoding: one query at a time against the cache's slots, grouped-query heads
        got, want = _draw(config), _draw(CONFIGS[name])
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_allclose(got.logprobs, want.logprobs, **TOL)


@pytest.mark.parametrize("name, shared", [("gpt2", True), ("llama", False)])
def test_vocab_chunk_logprobs_match_the_whole_vocabulary(name, shared):
    # A chunk of 8 does not divide the 37 ids: the last chunk is padded.
    got = _logprobs_and_grads(CONFIGS[name], _params(name), shared=shared, vocab_chunk=8)
    _assert_same(got, _plain(name, shared))


def test_vocab_chunk_must_be_a_non_negative_int():
    tokens, mask, response_mask = _batch()
    with pytest.raises(ValueError, match="vocab_chunk must be an int >= 0"):
        sequence_logprobs(_params("gpt2"), tokens, response_mask, model=CONFIGS["gpt2"], vocab_chunk=-1)


def test_prefill_scores_the_first_token_with_the_last_prompt_position():
    # The sampler projects only the prompt's last hidden state; its first token's log-prob must be the
    # full forward pass's log-softmax at that position.
    config, params = CONFIGS["llama"], _params("llama")
    tokens, mask, _ = _batch()
    out = _draw(config)
    full = jax.nn.log_softmax(logits(config, params, tokens[:, 0, :PROMPT_LEN], mask[:, 0, :PROMPT_LEN])[:, -1])
    first = out.tokens[:, :, PROMPT_LEN]
    np.testing.assert_allclose(out.logprobs[:, :, 0], jnp.take_along_axis(full, first, axis=-1), **TOL)
    assert len(np.unique(np.asarray(first))) > 1  # the draws differ, so the check covers several ids


def test_remat_and_attention_options_are_validated():
    with pytest.raises(ValueError, match="TransformerConfig.remat must be one of"):
        dataclasses.replace(CONFIGS["gpt2"], remat="everything")
    with pytest.raises(ValueError, match="TransformerConfig.attention must be one of"):
        dataclasses.replace(CONFIGS["gpt2"], attention="flash")
    for field, bad, message in [
        ("remat", "everything", "config.memory.remat='everything' must be one of"),
        ("attention", "flash", "config.memory.attention='flash' must be one of"),
        ("logprob_vocab_chunk", -1, "config.memory.logprob_vocab_chunk=-1 must be an integer >= 0"),
    ]:
        config = base_config()
        config.memory[field] = bad
        with pytest.raises(ConfigError, match=message):
            validate(config)
