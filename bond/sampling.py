"""Jitted ancestral sampler: N completions per prompt from a KV-cached transformer.

Output layout follows t5x decoding's `[batch, num_decodes, length]`: `sample` returns tensors of
shape [B, N, ...] with the N samples of prompt b in row b (prompt-major order when flattened).

Algorithm (one compiled program per shape and static option set):
  1. prefill: one forward pass over the B left-padded prompts gives their keys/values and the
     next-token logits at the last prompt slot;
  2. those are repeated N times (the prompt is encoded once, not N times) into a decoding cache
     with one free slot per response token that will be fed back;
  3. the first response token is drawn from the prefill logits; then `lax.while_loop` feeds each
     drawn token through the model at its cache slot (`lax.dynamic_update_slice` into the explicit
     cache pytree) and draws the next one, stopping after `max_new_tokens` tokens or as soon as
     every sequence has emitted EOS.
Each draw is from softmax(filter(logits / temperature)) where filter keeps the top-k logits and
then the nucleus of probability top_p (Holtzman et al. 2020, "The Curious Case of Neural Text
Degeneration"), and EOS is masked for the first `min_new_tokens` tokens. Draws use inverse-CDF
sampling with one uniform per sequence and step, all drawn from `key` before the loop.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from bond import lora, sharding
from bond.models.transformer import (
    Transformer,
    TransformerConfig,
    as_transformer,
    init_cache,
    positions_from_mask,
)

PAD_ID = 0
# The sampler settings (config fields) under which it draws from the model itself: the samples'
# distribution is the policy's and their log-probs are the model's.
PLAIN_SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_new_tokens": 0}


class SampleOutput(NamedTuple):
    """Sampled sequences; B prompts, N samples each, prompt length P, L = max_new_tokens.

    Attributes:
      tokens: [B, N, P + L] int32, the prompt (as given, left-padded) then the response; after the
        first EOS every response token is PAD_ID.
      attention_mask: [B, N, P + L] int32, the prompt mask, then 1 on response tokens up to and
        including the first EOS.
      response_mask: [B, N, P + L] float32, 0 on the prompt, then as attention_mask.
      logprobs: [B, N, L] float32, log-probability of each response token under the distribution it
        was drawn from (after temperature, top-k, top-p, EOS masking); 0 after the first EOS.
      lengths: [B, N] int32, number of counted response tokens (EOS included).
    """

    tokens: jax.Array
    attention_mask: jax.Array
    response_mask: jax.Array
    logprobs: jax.Array
    lengths: jax.Array


def sampling_logprobs(
    logits: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    top_k: int = 0,
    top_p: ArrayLike = 1.0,
) -> jax.Array:
    """Log-probabilities [..., V] of the sampling distribution defined by raw `logits` [..., V].

    z = logits / temperature; top-k (k > 0) keeps the k largest z; top-p keeps, in decreasing
    order of probability, every token whose preceding cumulative probability is < top_p (the
    smallest prefix with mass >= top_p); excluded tokens get log-probability -inf. Ties at a cutoff
    are kept. top_p >= 1 and top_k = 0 disable the filters. Math in float32.
    """
    scaled = jnp.asarray(logits, jnp.float32) / temperature
    vocab_size = scaled.shape[-1]
    if 0 < top_k < vocab_size:
        kth_largest = jax.lax.top_k(scaled, top_k)[0][..., -1:]
        scaled = jnp.where(scaled < kth_largest, -jnp.inf, scaled)

    def nucleus(z: jax.Array) -> jax.Array:
        descending = -jnp.sort(-z, axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < top_p, descending, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(z < cutoff, -jnp.inf, z)

    scaled = jax.lax.cond(jnp.all(jnp.asarray(top_p) < 1.0), nucleus, lambda z: z, scaled)
    return jax.nn.log_softmax(scaled, axis=-1)


def inverse_cdf_sample(probs: ArrayLike, uniform: ArrayLike) -> jax.Array:
    """Token ids [...] drawn from unnormalised probabilities `probs` [..., V] with uniforms [...] in [0, 1).

    Inverse-CDF sampling: the first token whose cumulative mass exceeds uniform * total mass,
    taken among tokens of positive probability (so that float32 rounding of the cumulative sum can
    never select an excluded token; the last such token is the fallback). One uniform per draw
    instead of one Gumbel variate per vocabulary entry keeps decoding cheap.
    """
    probs = jnp.asarray(probs, jnp.float32)
    cumulative = jnp.cumsum(probs, axis=-1)
    threshold = jnp.asarray(uniform, jnp.float32)[..., None] * cumulative[..., -1:]
    positive = probs > 0
    above = (cumulative > threshold) & positive
    vocab_size = probs.shape[-1]
    last_positive = vocab_size - 1 - jnp.argmax(positive[..., ::-1], axis=-1)
    return jnp.where(jnp.any(above, axis=-1), jnp.argmax(above, axis=-1), last_positive).astype(jnp.int32)


def _concrete(x) -> np.ndarray | None:
    """x as a numpy array, or None when x is traced (its value is unknown at trace time)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _validate(config, prompts, prompt_mask, temperature, top_p, num_samples, max_new_tokens, top_k, eos_id,
              min_new_tokens, micro_batches=1) -> None:
    if prompts.ndim != 2 or not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise ValueError(
            f"prompts must be an int array [batch, prompt_len], got shape {prompts.shape} dtype {prompts.dtype}."
        )
    if prompts.shape[1] == 0:
        raise ValueError("prompts must hold at least one token per row (e.g. a BOS token, id 0, with mask 1).")
    if prompt_mask.shape != prompts.shape:
        raise ValueError(f"prompt_mask must have the shape of prompts {prompts.shape}, got {prompt_mask.shape}.")
    for name, value, low in (("num_samples", num_samples, 1), ("max_new_tokens", max_new_tokens, 1),
                             ("top_k", top_k, 0), ("min_new_tokens", min_new_tokens, 0), ("eos_id", eos_id, 0)):
        if not _is_int(value) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
    if min_new_tokens > max_new_tokens:
        raise ValueError(f"min_new_tokens ({min_new_tokens}) must be <= max_new_tokens ({max_new_tokens}).")
    if not _is_int(micro_batches) or micro_batches < 1 or prompts.shape[0] % micro_batches:
        raise ValueError(f"micro_batches must be an int >= 1 dividing the {prompts.shape[0]} prompts, "
                         f"got {micro_batches!r}.")
    if top_k > config.vocab_size:
        raise ValueError(f"top_k ({top_k}) must be <= vocab_size ({config.vocab_size}); use 0 to disable.")
    if eos_id >= config.vocab_size:
        raise ValueError(f"eos_id ({eos_id}) must be < vocab_size ({config.vocab_size}).")
    total = prompts.shape[1] + max_new_tokens
    if total > config.max_len:
        raise ValueError(
            f"prompt_len + max_new_tokens = {total} exceeds TransformerConfig.max_len={config.max_len}; "
            "lower max_new_tokens, shorten the prompts, or raise max_len."
        )
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if jnp.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}.")
    temperature_value, top_p_value = _concrete(temperature), _concrete(top_p)
    if temperature_value is not None and not np.all(temperature_value > 0):
        raise ValueError(f"temperature must be > 0, got {temperature_value}.")
    if top_p_value is not None and not np.all((top_p_value > 0) & (top_p_value <= 1)):
        raise ValueError(f"top_p must be in (0, 1], got {top_p_value}.")
    mask = _concrete(prompt_mask)
    if mask is not None and mask.size:
        mask = mask.astype(bool)
        if not mask[:, -1].all() or (mask[:, 1:] < mask[:, :-1]).any():
            raise ValueError(
                "prompt_mask must describe LEFT-padded prompts with at least one real token: zeros, then "
                "ones, with a 1 in the last column of every row."
            )


def sample(
    model: Transformer | TransformerConfig,
    params,
    prompts: ArrayLike,
    prompt_mask: ArrayLike,
    key: jax.Array,
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: ArrayLike = 1.0,
    top_k: int = 0,
    top_p: ArrayLike = 1.0,
    eos_id: int = 0,
    min_new_tokens: int = 0,
    decode_weights: str = "auto",
    micro_batches: int = 1,
) -> SampleOutput:
    """Draw `num_samples` completions of up to `max_new_tokens` tokens for each prompt.

    Args:
      model: a Transformer or its TransformerConfig; `params` may be any parameter tree of that
        shape (policy, anchor, reference), all served by the same compiled program.
      params: model parameters.
      prompts: [B, P] int, left-padded.
      prompt_mask: [B, P], 1 on real prompt tokens (zeros then ones in each row).
      key: PRNG key; the same key gives the same samples.
      num_samples: N, samples per prompt (static).
      max_new_tokens: L, response length limit (static).
      temperature: > 0, divides the logits (traced: sweeping it does not recompile).
      top_k: keep the k most likely tokens, 0 = off (static).
      top_p: nucleus mass in (0, 1], 1 = off (traced).
      eos_id: token that ends a response (static).
      min_new_tokens: EOS is masked for the first min_new_tokens tokens (static).
      decode_weights: where the weights live while decoding under a mesh set in context
        (`sharding.gather_for_decoding`: 'auto', 'fsdp' or 'gathered'; static).
      micro_batches: decode the prompts in this many strided groups in turn (lax.map), so that the
        KV cache and activations are those of B/micro_batches prompts; each row keeps its uniforms,
        so the samples are the same for every count (static; must divide B).

    Returns:
      SampleOutput with [B, N, ...] arrays (see its docstring).
    """
    config = as_transformer(model).config
    prompts, prompt_mask = jnp.asarray(prompts), jnp.asarray(prompt_mask)
    _validate(config, prompts, prompt_mask, temperature, top_p, num_samples, max_new_tokens, top_k, eos_id,
              min_new_tokens, micro_batches)
    return _sample_jit(
        config, params, prompts.astype(jnp.int32), prompt_mask.astype(jnp.int32), key,
        jnp.asarray(temperature, jnp.float32), jnp.asarray(top_p, jnp.float32),
        num_samples=num_samples, max_new_tokens=max_new_tokens, top_k=top_k, eos_id=eos_id,
        min_new_tokens=min_new_tokens, decode_weights=decode_weights, micro_batches=micro_batches,
    )


@functools.partial(
    jax.jit,
    static_argnames=("config", "num_samples", "max_new_tokens", "top_k", "eos_id", "min_new_tokens", "decode_weights",
                     "micro_batches"),
)
def _sample_jit(config, params, prompts, prompt_mask, key, temperature, top_p, *, num_samples, max_new_tokens,
                top_k, eos_id, min_new_tokens, decode_weights="auto", micro_batches=1) -> SampleOutput:
    params = sharding.gather_for_decoding(params, lora.logical_axes(config, params), decode_weights)
    # All randomness is drawn up front: one uniform per sequence and step, [B, N, L] (row b·N + n).
    uniforms = jax.random.uniform(key, (max_new_tokens, prompts.shape[0] * num_samples), jnp.float32)
    uniforms = uniforms.T.reshape(prompts.shape[0], num_samples, max_new_tokens)

    def decode_group(group):
        return _decode(config, params, *group, temperature, top_p, num_samples=num_samples,
                       max_new_tokens=max_new_tokens, top_k=top_k, eos_id=eos_id, min_new_tokens=min_new_tokens)

    return sharding.map_micro_batches(decode_group, (prompts, prompt_mask, uniforms), micro_batches)


def _decode(config, params, prompts, prompt_mask, uniforms, temperature, top_p, *, num_samples, max_new_tokens,
            top_k, eos_id, min_new_tokens) -> SampleOutput:
    """Prefill and decode loop of `sample` for B prompts, with `uniforms` [B, N, L] the draws' uniforms."""
    module = Transformer(config)
    batch, prompt_len = prompts.shape
    num_rows = batch * num_samples
    uniforms = uniforms.reshape(num_rows, max_new_tokens).T  # [L, rows]
    vocab_ids = jnp.arange(config.vocab_size)
    repeat = lambda x: sharding.constrain_batch(jnp.repeat(x, num_samples, axis=0))  # [B·N, ...] rows

    prompt_hidden, prompt_cache = module.apply(
        {"params": params}, prompts, positions_from_mask(prompt_mask), prompt_mask,
        init_cache(config, batch, prompt_len), 0, method=Transformer.hidden_states,
    )
    # Only the last prompt position is projected onto the vocabulary: it scores response token 0.
    prefill_logits = module.apply({"params": params}, prompt_hidden[:, -1], method=Transformer.project)
    # Decoding cache: the prompt's keys/values for each of the N samples, then one slot per fed
    # response token (the last drawn token is never fed back: max_new_tokens - 1 slots).
    new_slots = ((0, 0), (0, 0), (0, max_new_tokens - 1), (0, 0))
    cache = jax.tree_util.tree_map(lambda x: jnp.pad(repeat(x), new_slots), prompt_cache)
    key_mask = repeat(jnp.pad(prompt_mask, ((0, 0), (0, max_new_tokens - 1)), constant_values=1))
    first_position = repeat(jnp.sum(prompt_mask, axis=1))  # position of response token 0

    def draw(step, step_logits, done):
        """Token `step` of every row ([num_rows]) and its log-probability; PAD and 0 once done."""
        if min_new_tokens > 0:
            step_logits = jnp.where((step < min_new_tokens) & (vocab_ids == eos_id), -jnp.inf, step_logits)
        logp = sampling_logprobs(step_logits, temperature=temperature, top_k=top_k, top_p=top_p)
        token = inverse_cdf_sample(jnp.exp(logp), uniforms[step])
        token_logp = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
        return jnp.where(done, PAD_ID, token), jnp.where(done, 0.0, token_logp)

    not_done = jnp.zeros((num_rows,), bool)
    token, token_logp = draw(0, repeat(prefill_logits), not_done)
    responses = jnp.zeros((num_rows, max_new_tokens), jnp.int32).at[:, 0].set(token)
    logprobs = jnp.zeros((num_rows, max_new_tokens), jnp.float32).at[:, 0].set(token_logp)

    def keep_going(state):
        step, _, done, *_ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode_step(state):
        step, token, done, responses, logprobs, cache = state
        step_logits, cache = module.apply(
            {"params": params}, token[:, None], (first_position + step - 1)[:, None], key_mask, cache,
            prompt_len + step - 1,
        )
        token, token_logp = draw(step, step_logits[:, 0], done)
        responses = jax.lax.dynamic_update_slice(responses, token[:, None], (0, step))
        logprobs = jax.lax.dynamic_update_slice(logprobs, token_logp[:, None], (0, step))
        return (step + 1, *sharding.constrain_batch((token, done | (token == eos_id), responses, logprobs, cache)))

    state = (jnp.int32(1), *sharding.constrain_batch((token, token == eos_id, responses, logprobs, cache)))
    _, _, _, responses, logprobs, _ = jax.lax.while_loop(keep_going, decode_step, state)

    # Counted tokens: everything up to and including the first EOS.
    is_eos = (responses == eos_id).astype(jnp.int32)
    counted = (jnp.cumsum(is_eos, axis=1) - is_eos) == 0
    prompt_rows = repeat(prompts)
    tokens = jnp.concatenate([prompt_rows, responses], axis=1)
    attention_mask = jnp.concatenate([repeat(prompt_mask), counted.astype(jnp.int32)], axis=1)
    response_mask = jnp.concatenate(
        [jnp.zeros((num_rows, prompt_len), jnp.float32), counted.astype(jnp.float32)], axis=1
    )
    unflatten = lambda x: x.reshape((batch, num_samples) + x.shape[1:])
    return SampleOutput(
        tokens=unflatten(tokens),
        attention_mask=unflatten(attention_mask),
        response_mask=unflatten(response_mask),
        logprobs=unflatten(logprobs),
        lengths=unflatten(jnp.sum(counted, axis=1).astype(jnp.int32)),
    )
