"""Exact evaluation on tasks small enough to enumerate every response.

With a vocabulary of V tokens (one of them EOS) and responses of at most L tokens, the
sampler (`bond.sampling.sample` with `max_new_tokens=L`) can produce exactly these outcomes:

* a response of length l in 1..L whose last token is EOS and whose first l-1 tokens are not:
  K^(l-1) of them for each l, with K = V - 1 non-EOS tokens;
* a full-length response of L non-EOS tokens, cut at the length limit: K^L of them.

So the response space has

    M = sum_{l=1..L} K^(l-1) + K^L = (K^L - 1) / (K - 1) + K^L      (K >= 2),
    M = L + 1                                                       (K = 1),

elements (V = 9, L = 5: M = 4,681 + 32,768 = 37,449). This module lists them
(`enumerate_responses`), computes log π(y|x) of every one of them for every prompt with a few
batched forward passes (`response_logprobs`), and turns those tables into exact metrics:
expected reward, KL to the reference, KL to and from the exact best-of-N distribution of the
reference, and the win rate against the reference (`exact_metrics`); and into the reference's own
trade-offs on the reward/KL plane (`reference_front`: the Best-of-N points and the KL-regularized
front π_β ∝ π_ref·exp(r/β)).

How `response_logprobs` saves work (prefix sharing). The responses form a trie: a node is a
prefix of non-EOS tokens, and every response is a node followed by EOS, or a depth-(L-1) leaf
followed by one more non-EOS token. A causal model's next-token distribution at a node does not
depend on what follows it, so one forward step per node gives the log-probabilities of all the
responses that continue it:

    log π(s_<t, EOS | x) = sum_{u<t} log p(s_u | x, s_<u) + log p(EOS | x, s_<t)
    log π(s, v | x)      = sum_{u<L-1} log p(s_u | x, s_<u) + log p(v | x, s)      (v != EOS, |s| = L-1).

The trie is walked breadth-first with the model's KV cache, exactly as the sampler decodes: a
prefill of the prompt, then one level at a time, each node's cache repeated for its K children
and the children fed as one new token each. Per prompt that is a prefill of P tokens plus
sum_{t=1..L-1} K^t single-token rows (4,680 for V = 9, L = 5): fewer forward tokens than
responses, against P + L per response when each response is scored separately (measured on 2
CPU cores, 2-layer d=64 model, 16 prompts x 37,449 responses: about 1 s, against about 130 s for
`sequence_logprobs` on every (prompt, response) pair). A trie wider than `chunk_size` leaves is cut into subtrees ("heads" of fixed first
tokens, each with its own prefill) walked one after another inside one jitted `jax.lax.map`, so
memory stays bounded and any parameter pytree of the same shapes reuses the compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from bond import bon, models

# Enumerations beyond this many responses are refused: they would not fit the purpose (seconds on a
# CPU) and usually mean a wrong vocab_size or max_len.
MAX_RESPONSES = 20_000_000


def num_responses(vocab_size: int, max_len: int) -> int:
    """Number M of distinct responses of at most `max_len` tokens with one EOS token.

    M = sum_{l=1..L} K^(l-1) + K^L with K = vocab_size - 1: EOS-terminated responses of each
    length l (last token EOS, the l-1 before it not EOS) plus the full-length responses without
    EOS that the length limit cuts.
    """
    _check_space_args(vocab_size, max_len, eos_id=0)
    k = vocab_size - 1
    return sum(k ** (length - 1) for length in range(1, max_len + 1)) + k**max_len


@dataclasses.dataclass(frozen=True, eq=False)
class ResponseSpace:
    """Every response of a small task, in a fixed order.

    Order: EOS-terminated responses by length l = 1..L, then the full-length responses without
    EOS; inside each block, lexicographic in the non-EOS tokens (ascending ids). After the EOS
    the rows are padded with `eos_id` (the sampler's padding, token 0 in this codebase).

    Attributes:
      vocab_size: V, EOS included.
      max_len: L, the sampler's `max_new_tokens`.
      eos_id: the EOS token id.
      tokens: [M, L] int32 responses.
      response_mask: [M, L] float32, 1 on the tokens that count (up to and including EOS).
      lengths: [M] int32 number of counted tokens.
    """

    vocab_size: int
    max_len: int
    eos_id: int
    tokens: jax.Array
    response_mask: jax.Array
    lengths: jax.Array

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def non_eos_tokens(self) -> np.ndarray:
        """The K = V - 1 non-EOS token ids, ascending (the digits of the enumeration)."""
        return np.array([v for v in range(self.vocab_size) if v != self.eos_id], dtype=np.int32)


def _check_space_args(vocab_size: int, max_len: int, eos_id: int) -> None:
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2 (EOS and at least one other token), got {vocab_size}.")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}.")
    if not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id must be in [0, vocab_size={vocab_size}), got {eos_id}.")


def _digit_rows(base: int, length: int) -> np.ndarray:
    """All base-`base` digit strings of `length` digits, lexicographic: [base**length, length]."""
    if length == 0:
        return np.zeros((1, 0), dtype=np.int64)
    return np.stack(np.unravel_index(np.arange(base**length), (base,) * length), axis=1)


def enumerate_responses(vocab_size: int, max_len: int, eos_id: int = 0) -> ResponseSpace:
    """Lists every response of at most `max_len` tokens; see `num_responses` for the count.

    Args:
      vocab_size: V, EOS included.
      max_len: L, the length limit (the sampler's `max_new_tokens`).
      eos_id: the EOS token id (0 in this codebase).

    Returns:
      A `ResponseSpace` with M = num_responses(V, L) rows, ordered as its docstring says.
    """
    _check_space_args(vocab_size, max_len, eos_id)
    count = num_responses(vocab_size, max_len)
    if count > MAX_RESPONSES:
        raise ValueError(
            f"vocab_size={vocab_size}, max_len={max_len} give {count:,} responses, more than "
            f"MAX_RESPONSES={MAX_RESPONSES:,}; exact evaluation needs a smaller vocab_size or max_len."
        )
    k = vocab_size - 1
    non_eos = np.array([v for v in range(vocab_size) if v != eos_id], dtype=np.int32)
    blocks, lengths = [], []
    for length in range(1, max_len + 1):
        body = non_eos[_digit_rows(k, length - 1)]
        rows = np.full((body.shape[0], max_len), eos_id, dtype=np.int32)
        rows[:, : length - 1] = body
        blocks.append(rows)
        lengths.append(np.full(body.shape[0], length, dtype=np.int32))
    blocks.append(non_eos[_digit_rows(k, max_len)].astype(np.int32))
    lengths.append(np.full(k**max_len, max_len, dtype=np.int32))
    tokens = np.concatenate(blocks)
    lengths = np.concatenate(lengths)
    mask = (np.arange(max_len)[None, :] < lengths[:, None]).astype(np.float32)
    return ResponseSpace(
        vocab_size=vocab_size,
        max_len=max_len,
        eos_id=eos_id,
        tokens=jnp.asarray(tokens),
        response_mask=jnp.asarray(mask),
        lengths=jnp.asarray(lengths),
    )


def response_index(space: ResponseSpace, responses: ArrayLike) -> jax.Array:
    """Row of `space` that each response is, e.g. to look sampled responses up in an exact table.

    Args:
      space: the enumeration.
      responses: [..., L] int response tokens as the sampler returns them (tokens after the first
        EOS are ignored).

    Returns:
      [...] int32 indices into `space.tokens`.
    """
    responses = jnp.asarray(responses)
    if responses.shape[-1] != space.max_len:
        raise ValueError(
            f"responses must have last dimension max_len={space.max_len}, got shape {responses.shape}."
        )
    return _response_index_jit(responses, vocab_size=space.vocab_size, eos_id=space.eos_id)


@functools.partial(jax.jit, static_argnames=("vocab_size", "eos_id"))
def _response_index_jit(responses: jax.Array, *, vocab_size: int, eos_id: int) -> jax.Array:
    k, big_l = vocab_size - 1, responses.shape[-1]
    is_eos = responses == eos_id
    has_eos = jnp.any(is_eos, axis=-1)
    length = jnp.where(has_eos, jnp.argmax(is_eos, axis=-1) + 1, big_l)
    digits = responses - (responses > eos_id)  # a non-EOS token's rank among the non-EOS ids
    # Block offsets: sum_{j<l} K^(j-1) before the EOS block of length l; the full-length block last.
    offsets = np.concatenate([[0], np.cumsum([k ** (j - 1) for j in range(1, big_l + 1)])])
    # The number of non-EOS digits is also the block: l-1 for EOS block l, L for the full block.
    num_digits = jnp.where(has_eos, length - 1, big_l)
    exponent = num_digits[..., None] - 1 - jnp.arange(big_l)
    place_values = jnp.where(exponent >= 0, k ** jnp.maximum(exponent, 0), 0)
    within = jnp.sum(digits * place_values, axis=-1)
    return (jnp.asarray(offsets, dtype=jnp.int32)[num_digits] + within).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Exact log-probabilities by prefix sharing (a KV-cached walk down the response trie)


def _tail_depth(num_non_eos: int, max_len: int, chunk_size: int) -> int:
    """Depth c of the subtrees walked in one piece: the largest c <= L-1 with K^c <= chunk_size."""
    depth = 0
    while depth < max_len - 1 and num_non_eos ** (depth + 1) <= chunk_size:
        depth += 1
    return depth


def _walk_subtrees(
    config: models.TransformerConfig,
    params: Any,
    prompts: jax.Array,
    prompt_mask: jax.Array,
    heads: jax.Array,
    temperature: jax.Array,
    *,
    eos_id: int,
    non_eos: tuple[int, ...],
    tail_depth: int,
) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """Log-probabilities of every response under each of n (prompt, head) items.

    A head is a prefix of h = L-1-c non-EOS tokens; below it hangs a complete K-ary trie of
    depth c. One forward pass of prompt + head fills a KV cache (as the sampler's prefill does);
    then each level j = 1..c feeds the K children of every level-(j-1) node as one new token
    with its parent's cache repeated K times (the sampler's decode step, on all branches).
    Rows are item-major, and inside an item lexicographic.

    Args:
      prompts, prompt_mask: [n, P]; heads: [n, h].

    Returns:
      ends: per response depth t = 0..L-1, [n, n_t] log π(prefix + EOS | x) of the nodes of
        depth t under the item's head, lexicographic (n_t = 1 for t <= h: the head's own prefix
        of length t; n_t = K^(t-h) below it).
      full: [n, K^c * K] log π(leaf + v | x) for the leaves and non-EOS tokens v, lexicographic.
    """
    module = models.Transformer(config)
    num_items, prompt_len = prompts.shape
    head_len, k = heads.shape[1], len(non_eos)
    num_slots = prompt_len + head_len + tail_depth
    non_eos_ids = jnp.asarray(non_eos, dtype=jnp.int32)
    key_mask = jnp.concatenate(
        [prompt_mask, jnp.ones((num_items, head_len + tail_depth), jnp.int32)], axis=1
    )
    logits, cache = module.apply(
        {"params": params},
        jnp.concatenate([prompts, heads], axis=1),
        models.positions_from_mask(key_mask[:, : prompt_len + head_len]),
        key_mask,
        models.init_cache(config, num_items, num_slots),
        0,
    )
    # Slot P-1+t predicts response token t: the head's own prefixes are depths t = 0..h.
    logp = jax.nn.log_softmax(logits[:, prompt_len - 1 :] / temperature, axis=-1)
    head_logp = jnp.take_along_axis(logp[:, :head_len], heads[:, :, None], axis=-1)[..., 0]
    prefix = jnp.concatenate([jnp.zeros((num_items, 1), logp.dtype), jnp.cumsum(head_logp, axis=1)], axis=1)
    ends = [prefix[:, t, None] + logp[:, t, eos_id, None] for t in range(head_len + 1)]

    node_logp, next_logp = prefix[:, head_len, None], logp[:, head_len, None]  # [n, nodes], [n, nodes, V]
    first_response_position = jnp.sum(prompt_mask, axis=1)
    for level in range(1, tail_depth + 1):
        node_logp = (node_logp[:, :, None] + next_logp[:, :, non_eos_ids]).reshape(num_items, -1)
        nodes = node_logp.shape[1]
        cache = jax.tree.map(lambda c: jnp.repeat(c, k, axis=0), cache)
        depth = head_len + level
        logits, cache = module.apply(
            {"params": params},
            jnp.tile(non_eos_ids, num_items * nodes // k)[:, None],
            jnp.repeat(first_response_position + depth - 1, nodes)[:, None],
            jnp.repeat(key_mask, nodes, axis=0),
            cache,
            prompt_len + depth - 1,
        )
        next_logp = jax.nn.log_softmax(logits[:, 0] / temperature, axis=-1).reshape(num_items, nodes, -1)
        ends.append(node_logp + next_logp[:, :, eos_id])
    full = (node_logp[:, :, None] + next_logp[:, :, non_eos_ids]).reshape(num_items, -1)
    return tuple(ends), full


@functools.partial(
    jax.jit, static_argnames=("config", "eos_id", "non_eos", "tail_depth", "items_per_step")
)
def _response_logprobs_jit(
    config: models.TransformerConfig,
    params: Any,
    prompts: jax.Array,
    prompt_mask: jax.Array,
    heads: jax.Array,
    temperature: jax.Array,
    *,
    eos_id: int,
    non_eos: tuple[int, ...],
    tail_depth: int,
    items_per_step: int,
) -> jax.Array:
    num_prompts, num_heads = prompts.shape[0], heads.shape[0]
    k, head_len = len(non_eos), heads.shape[1]

    def step(items: jax.Array) -> tuple[tuple[jax.Array, ...], jax.Array]:
        prompt_rows, head_rows = items // num_heads, items % num_heads
        return _walk_subtrees(
            config, params, prompts[prompt_rows], prompt_mask[prompt_rows], heads[head_rows], temperature,
            eos_id=eos_id, non_eos=non_eos, tail_depth=tail_depth,
        )

    # One item per (prompt, head), prompt-major; `items_per_step` of them per forward pass (it
    # divides their number), the steps one after another: memory is bounded by one step.
    items = jnp.arange(num_prompts * num_heads).reshape(-1, items_per_step)
    ends, full = jax.lax.map(step, items)
    blocks = []
    for depth, values in enumerate(ends):
        values = values.reshape(num_prompts, num_heads, -1)
        if depth < head_len:
            # Depth-t prefixes inside the head: one per head; the heads whose last h-t tokens
            # are the lowest digit list each of them once, lexicographically.
            values = values[:, :: k ** (head_len - depth), 0]
        blocks.append(values.reshape(num_prompts, -1))
    blocks.append(full.reshape(num_prompts, -1))
    return jnp.concatenate(blocks, axis=1)


def response_logprobs(
    model: Any,
    params: Any,
    prompts: ArrayLike,
    prompt_mask: ArrayLike,
    space: ResponseSpace,
    *,
    temperature: ArrayLike = 1.0,
    chunk_size: int = 1024,
) -> jax.Array:
    """Exact log π(y|x) of every response y of `space` for every prompt x.

    Walks the response trie with a KV cache (module docstring): the trie is cut into subtrees
    of at most `chunk_size` leaves, each walked in one piece after a prefill of prompt + head.
    Token log-probabilities are log_softmax(logits / temperature), as in
    `bond.models.sequence_logprobs` (the tests compare the two response by response).

    Args:
      model: a `bond.models.Transformer` or `TransformerConfig`.
      params: any parameter pytree of the model's shapes (policy, anchor or reference); all of
        them share one compiled program.
      prompts: [B, P] int prompts, left-padded.
      prompt_mask: [B, P] 1 on real prompt tokens.
      space: the response enumeration (`enumerate_responses`) for the model's vocabulary.
      temperature: temperature of the evaluated policy (traced).
      chunk_size: most leaves (rows of a forward pass) walked at once; bounds memory, not the result.

    Returns:
      [B, M] float32 log-probabilities in the order of `space`; their exp sums to 1 per prompt.
    """
    config = models.as_transformer(model).config
    prompts = jnp.asarray(prompts, dtype=jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, dtype=jnp.int32)
    if prompts.ndim != 2:
        raise ValueError(f"prompts must be [B, P], got shape {prompts.shape}.")
    if prompt_mask.shape != prompts.shape:
        raise ValueError(
            f"prompt_mask must have the prompts' shape {prompts.shape}, got {prompt_mask.shape}."
        )
    if config.vocab_size != space.vocab_size:
        raise ValueError(
            f"space.vocab_size={space.vocab_size} does not match the model's vocab_size="
            f"{config.vocab_size}; call enumerate_responses with the model's vocab_size."
        )
    if prompts.shape[1] + space.max_len - 1 > config.max_len:
        raise ValueError(
            f"prompt length {prompts.shape[1]} + space.max_len {space.max_len} - 1 exceeds the "
            f"model's max_len={config.max_len}; shorten the prompts or the responses."
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    k = space.vocab_size - 1
    tail_depth = _tail_depth(k, space.max_len, chunk_size)
    heads = space.non_eos_tokens[_digit_rows(k, space.max_len - 1 - tail_depth)]
    return _response_logprobs_jit(
        config, params, prompts, prompt_mask, jnp.asarray(heads, dtype=jnp.int32),
        jnp.asarray(temperature, dtype=jnp.float32),
        eos_id=space.eos_id,
        non_eos=tuple(int(v) for v in space.non_eos_tokens),
        tail_depth=tail_depth,
        items_per_step=_largest_divisor_at_most(
            prompts.shape[0] * heads.shape[0], max(1, chunk_size // k**tail_depth)
        ),
    )


def _largest_divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of n that is <= cap (equal-sized steps: one compiled step body)."""
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


# ---------------------------------------------------------------------------------------------
# Exact metrics from the tables (the best-of-N math is bond.bon)


@functools.partial(jax.jit, static_argnames=("bon_ns",))
def _exact_metrics_jit(
    logprobs: jax.Array, ref_logprobs: jax.Array, rewards: jax.Array, bon_ns: tuple[int, ...]
) -> dict[str, jax.Array]:
    probs, ref_probs = jnp.exp(logprobs), jnp.exp(ref_logprobs)
    per_prompt = {
        "reward": jnp.sum(probs * rewards, axis=-1),
        "kl_policy_ref": bon.kl_divergence_from_logs(logprobs, ref_logprobs),
        "win_rate_vs_ref": bon.win_rate(probs, ref_probs, rewards),
    }
    for n in bon_ns:
        log_bon = bon.bon_log_probs(ref_probs, rewards, jnp.asarray(n, jnp.float32))
        per_prompt[f"bon{n}_reward"] = jnp.sum(jnp.exp(log_bon) * rewards, axis=-1)
        per_prompt[f"kl_policy_bon{n}"] = bon.kl_divergence_from_logs(logprobs, log_bon)
        per_prompt[f"kl_bon{n}_policy"] = bon.kl_divergence_from_logs(log_bon, logprobs)
    return per_prompt


def exact_metrics(
    logprobs: ArrayLike,
    ref_logprobs: ArrayLike,
    rewards: ArrayLike,
    bon_ns: Sequence[int] = (2, 4, 8, 16),
) -> dict[str, dict[str, jax.Array]]:
    """Exact metrics of a policy π against a reference π_ref, per prompt and averaged.

    With π_BoN(n) the best-of-n distribution of π_ref under the reward, ties broken uniformly
    at random (`bond.bon.bon_log_probs`, BOND Thm 1), the per-prompt metrics are:

      reward            E_π[r(y)]
      kl_policy_ref     KL(π‖π_ref)
      win_rate_vs_ref   P(r(Y) > r(Y')) + ½ P(r(Y) = r(Y')),  Y ~ π, Y' ~ π_ref
      bon{n}_reward     E_{π_BoN(n)}[r(y)]  (the reward BOND aims at)
      kl_policy_bon{n}  KL(π‖π_BoN(n))      (the backward KL BOND minimises)
      kl_bon{n}_policy  KL(π_BoN(n)‖π)      (the forward KL)

    Args:
      logprobs: [B, M] exact log π(y|x) over the whole response space (`response_logprobs`).
      ref_logprobs: [B, M] the same for π_ref.
      rewards: [B, M] finite rewards r(x, y).
      bon_ns: the values of N for the best-of-N metrics.

    Returns:
      {"per_prompt": {name: [B] array}, "mean": {name: scalar array}}.
    """
    logprobs = jnp.asarray(logprobs, jnp.float32)
    ref_logprobs = jnp.asarray(ref_logprobs, jnp.float32)
    rewards = jnp.asarray(rewards, jnp.float32)
    if logprobs.ndim != 2:
        raise ValueError(f"logprobs must be [B, M], got shape {logprobs.shape}.")
    for name, value in (("ref_logprobs", ref_logprobs), ("rewards", rewards)):
        if value.shape != logprobs.shape:
            raise ValueError(f"{name} must have the shape of logprobs {logprobs.shape}, got {value.shape}.")
    if not bool(jnp.all(jnp.isfinite(rewards))):
        raise ValueError("rewards must be finite; the reward function returned NaN or inf.")
    bon_ns = tuple(int(n) for n in bon_ns)
    if any(n < 1 for n in bon_ns):
        raise ValueError(f"bon_ns must be positive integers, got {bon_ns}.")
    per_prompt = _exact_metrics_jit(logprobs, ref_logprobs, rewards, bon_ns)
    return {"per_prompt": per_prompt, "mean": {k: jnp.mean(v) for k, v in per_prompt.items()}}


# ---------------------------------------------------------------------------------------------
# The reference's exact trade-offs on the reward/KL plane: Best-of-N and the KL-regularized front

# β of the KL-regularized front, dense enough that linear interpolation between its points is
# within ~1e-3 of it on the toy tasks' rewards.
FRONT_BETAS: tuple[float, ...] = tuple(np.geomspace(1e-3, 1e2, 240).tolist())


def _reference_tables(ref_probs: ArrayLike, rewards: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(π_ref normalized per prompt, r) as float64 [B, M] arrays, after checking their shapes."""
    ref_probs, rewards = np.asarray(ref_probs, np.float64), np.asarray(rewards, np.float64)
    if ref_probs.shape != rewards.shape or ref_probs.ndim != 2:
        raise ValueError(f"ref_probs and rewards must both be [B, M]; got {ref_probs.shape} and {rewards.shape}.")
    return ref_probs / ref_probs.sum(axis=-1, keepdims=True), rewards


def _kl_to(log_q: np.ndarray, log_ref: np.ndarray) -> np.ndarray:
    """KL(q‖π_ref) over the last axis, from log q and log π_ref (0·log 0 = 0)."""
    q = np.exp(log_q)
    positive = q > 0
    return np.sum(q * (np.where(positive, log_q, 0.0) - np.where(positive, log_ref, 0.0)), axis=-1)


def kl_regularized_front(ref_probs: ArrayLike, rewards: ArrayLike, betas: Sequence[float] = FRONT_BETAS
                         ) -> dict[str, list]:
    """(mean KL(π_β‖π_ref), mean E_{π_β}[r]) over prompts for π_β ∝ π_ref·exp(r/β), sorted by KL,
    starting with π_ref itself (β = ∞, listed as None).

    π_β is the maximizer of E_π[r] − β·KL(π‖π_ref) (the KL-control solution; Korbak et al. 2022,
    arXiv 2206.00761, and BOND §2). With one β for every prompt it maximizes the sum over prompts
    too, so these pairs lie on the Pareto front of mean reward against mean KL: no policy has a
    higher mean reward at the same mean KL.

    Args:
      ref_probs, rewards: [B, M] over each prompt's whole response space.
      betas: the β values (> 0).

    Returns:
      {"kl": [...], "reward": [...], "beta": [None, ...]}, plain floats, π_ref first.
    """
    ref_probs, rewards = _reference_tables(ref_probs, rewards)
    betas = np.asarray(betas, np.float64)
    if betas.ndim != 1 or not np.all(betas > 0):
        raise ValueError(f"betas must be a list of positive numbers, got {betas}.")
    # With r* the highest reward and s = Σ π_ref·exp((r − r*)/β) (no underflow: the best responses
    # add their own mass): E_β[r] = Σ π_ref·exp((r − r*)/β)·r / s and, as log π_β = log π_ref + r/β
    # − log Z_β, KL(π_β‖π_ref) = E_β[r]/β − log Z_β = (E_β[r] − r*)/β − log s.
    top = np.max(np.where(ref_probs > 0, rewards, -np.inf), axis=-1, keepdims=True)
    below_top = np.minimum(rewards - top, 0.0)  # responses with π_ref = 0 may lie above r*
    points = [(0.0, float(np.sum(ref_probs * rewards, axis=-1).mean()), None)]
    for beta in betas:  # one β at a time: memory stays [B, M]
        weights = ref_probs * np.exp(below_top / beta)
        total = weights.sum(axis=-1)
        reward = np.sum(weights * rewards, axis=-1) / total
        kl = np.maximum((reward - top[:, 0]) / beta - np.log(total), 0.0)
        points.append((float(kl.mean()), float(reward.mean()), float(beta)))
    points.sort(key=lambda p: p[0])
    return {"kl": [p[0] for p in points], "reward": [p[1] for p in points], "beta": [p[2] for p in points]}


# bon.bon_log_probs compiled once per table shape, N traced (op by op it costs seconds more per run).
_bon_log_probs = jax.jit(bon.bon_log_probs)


def bon_points(ref_probs: ArrayLike, rewards: ArrayLike, ns: Sequence[int]) -> dict[str, list]:
    """(mean KL(π_BoN‖π_ref), mean E_{π_BoN}[r]) over prompts for each N: where Best-of-N sampling
    from π_ref lands on the reward/KL plane (π_BoN from BOND Thm 1, `bond.bon.bon_log_probs`).

    Args:
      ref_probs, rewards: [B, M] over each prompt's whole response space.
      ns: the values of N (>= 1).

    Returns:
      {"n": [...], "kl": [...], "reward": [...]}, plain numbers in the order of `ns`.
    """
    ref_probs, rewards = _reference_tables(ref_probs, rewards)
    with np.errstate(divide="ignore"):
        log_ref = np.log(ref_probs)
    points = {"n": [], "kl": [], "reward": []}
    for n in ns:
        if int(n) != n or n < 1:
            raise ValueError(f"ns must be positive integers, got {list(ns)}.")
        log_bon = np.asarray(_bon_log_probs(ref_probs, rewards, float(n)), np.float64)
        points["n"].append(int(n))
        points["kl"].append(float(_kl_to(log_bon, log_ref).mean()))
        points["reward"].append(float(np.sum(np.exp(log_bon) * rewards, axis=-1).mean()))
    return points


def reference_front(ref_probs: ArrayLike, rewards: ArrayLike, bon_ns: Sequence[int],
                    betas: Sequence[float] = FRONT_BETAS) -> dict[str, dict[str, list]]:
    """The reference's exact trade-offs on a run's reward/KL plot, averaged over prompts as the
    evaluation metrics are: {"bon": `bon_points`, "front": `kl_regularized_front`}.

    A policy trained from π_ref lies on or below the front; Best-of-N points lie below it too
    (BoN is not the KL-optimal way to spend KL(·‖π_ref)), and BOND aims at them.
    """
    return {"bon": bon_points(ref_probs, rewards, bon_ns), "front": kl_regularized_front(ref_probs, rewards, betas)}
