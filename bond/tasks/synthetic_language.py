"""The synthetic language: a larger task with a hidden gold reward.

Shape. Tokens 0..127: 0 is EOS/PAD, 1..127 are content. Prompts have 4..8 tokens,
left-padded to P = 8; responses have at most L = 24 tokens. Too large to enumerate: this is
the task for sampled (Monte-Carlo) evaluation and for learned reward models.

Prompts. A prompt of length m ~ Uniform{4, ..., 8} is a walk of the "syntax" chain:

    x_1 ~ softmax(s),   x_{j+1} ~ softmax(S[x_j, 1:]),      (content tokens only)

with s = Z (fixed seed), S the transition logits below. 'train', 'eval' and the corpus use
independent random streams.

Hidden process (reference corpus). The prompt-conditioned Markov chain of bond.tasks,

    p(y_t = b | y_<t, x) = softmax_b( S[y_{t-1}, b] + c(x)[b] + e_t 1[b = 0] ),
    c(x) = (1/|x|) Σ_j A[x_j, :],   y_0 = x_|x|,   e_t = 2.5 + 0.2 (t − 1),   t = 1..24,

with S = 2.5 Z, A = 1.5 Z' (standard normal draws, fixed seed; column 0 is 0). About 2.5
nats per token; response lengths spread over 1..24 (5% at most 6, median 18) and about 9%
run to the limit without EOS.

Gold reward. With c_b(y) the number of times content token b occurs in the response and
y_1..y_n its content tokens (EOS excluded),

    r*(x, y) = Σ_b w_x(b) 1[c_b(y) ≥ 1]  +  Σ_{t=2}^{n} B[y_{t−1}, y_t]  −  μ Σ_b (c_b(y) − 1)_+ ,
    w_x = v + (1/|x|) Σ_j R[x_j, :],

with v = 0.3 Z_v (a token's own value), R = 0.6 Z_R (its relevance to the prompt tokens),
B a sparse bigram table (each entry non-zero with probability 0.05, then 1.5 Z_B) and
repetition cost μ = 0.5. Under the hidden process r* has mean ≈ −0.9 and standard deviation
≈ 2.2.

Why this shape. The gold reward pays for distinct relevant tokens and good bigrams and
charges for repeats. Reference samples repeat high-value tokens rarely and meet the sparse
bonus bigrams rarely, so a proxy reward model fitted to preference pairs of reference samples
learns little about either, and a policy that optimizes the proxy can raise it while the gold
reward falls (the over-optimization of Gao et al., 2023). For instance a proxy linear in
token counts, fitted by logistic regression to 20k pairs of ``preference_corpus``, scores
"its best token repeated 24 times" at +11 (reference mean −0.8) while r* is −10.6.

Preferences. ``preference_pairs`` labels a pair (a, b) of responses to the same prompt by the
Bradley–Terry model of the gold reward: P(a ≻ b) = σ((r*(a) − r*(b)) / τ).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from bond.tasks import (
    EOS_ID,
    PromptConditionedChain,
    Prompts,
    Sequences,
    SyntheticTask,
    chain_logprob,
    check_count,
    check_split,
    layout,
    programmatic_reward,
    prompt_mean,
    sample_categorical,
    sample_chain,
    split_rows,
    task_rng,
)

VOCAB_SIZE = 128
PROMPT_LENGTH = 8
MIN_PROMPT_LENGTH = 4
MAX_RESPONSE_LENGTH = 24
REPEAT_COST = 0.5  # μ
BIGRAM_DENSITY = 0.05

_TASK_ID = 2
_TABLE_STREAM, _TRAIN_STREAM, _EVAL_STREAM, _CORPUS_STREAM, _PREFERENCE_STREAM = range(5)
_SPLIT_STREAMS = {"train": _TRAIN_STREAM, "eval": _EVAL_STREAM}


class GoldTables(NamedTuple):
    """The gold reward's tables: v [V], R [V, V], B [V, V] (index 0 = EOS, always 0)."""

    token_value: np.ndarray
    relevance: np.ndarray
    bigram_bonus: np.ndarray


class _Tables(NamedTuple):
    chain: PromptConditionedChain
    first_token_logits: np.ndarray
    gold: GoldTables


@functools.cache
def _tables() -> _Tables:
    rng = task_rng(_TASK_ID, _TABLE_STREAM, 0)
    square = lambda: rng.standard_normal((VOCAB_SIZE, VOCAB_SIZE))
    transition, affinity = 2.5 * square(), 1.5 * square()
    relevance = 0.6 * square()
    bigram_bonus = 1.5 * square() * (rng.random((VOCAB_SIZE, VOCAB_SIZE)) < BIGRAM_DENSITY)
    token_value = 0.3 * rng.standard_normal(VOCAB_SIZE)
    first_token_logits = 1.0 * rng.standard_normal(VOCAB_SIZE)
    for table in (transition, affinity, relevance, bigram_bonus):
        table[:, EOS_ID] = 0.0
        table[EOS_ID, :] = 0.0
    token_value[EOS_ID] = 0.0
    first_token_logits[EOS_ID] = -np.inf
    eos_logits = 2.5 + 0.2 * np.arange(MAX_RESPONSE_LENGTH)
    f32 = lambda table: table.astype(np.float32)
    return _Tables(
        chain=PromptConditionedChain(f32(transition), f32(affinity), f32(eos_logits)),
        first_token_logits=f32(first_token_logits),
        gold=GoldTables(f32(token_value), f32(relevance), f32(bigram_bonus)),
    )


def chain() -> PromptConditionedChain:
    """The hidden process that writes the pretraining corpus."""
    return _tables().chain


def gold_tables() -> GoldTables:
    """The hidden gold reward's tables (for analysis; a proxy must not read them)."""
    return _tables().gold


def _sample_prompts(num: int, rng: np.random.Generator) -> Prompts:
    tables = _tables()
    content_transition = tables.chain.transition.copy()
    content_transition[:, EOS_ID] = -np.inf
    lengths = rng.integers(MIN_PROMPT_LENGTH, PROMPT_LENGTH + 1, size=num)
    walks = np.zeros((num, PROMPT_LENGTH), np.int32)
    logits = np.broadcast_to(tables.first_token_logits, (num, VOCAB_SIZE))
    for j in range(PROMPT_LENGTH):
        walks[:, j] = sample_categorical(logits, rng)
        logits = content_transition[walks[:, j]]
    # A walk of length m occupies the last m columns: column j holds step j - (P - m).
    step = np.arange(PROMPT_LENGTH) - (PROMPT_LENGTH - lengths[:, None])
    walk_tokens = np.take_along_axis(walks, np.maximum(step, 0), axis=1)
    tokens = np.where(step >= 0, walk_tokens, EOS_ID).astype(np.int32)
    return Prompts(tokens, (tokens != EOS_ID).astype(np.int32))


def prompts(split: str, num: int, seed: int) -> Prompts:
    """`num` prompts of `split`, i.i.d. walks of the syntax chain (module docstring)."""
    check_split(split)
    check_count(num)
    return _sample_prompts(num, task_rng(_TASK_ID, _SPLIT_STREAMS[split], seed))


def pretraining_corpus(num: int, seed: int) -> Sequences:
    """`num` rows: a fresh prompt, then one response of the hidden chain."""
    check_count(num)
    rng = task_rng(_TASK_ID, _CORPUS_STREAM, seed)
    corpus_prompts = _sample_prompts(num, rng)
    return layout(corpus_prompts, sample_chain(chain(), corpus_prompts, rng))


@jax.jit
def gold_reward(tokens: ArrayLike, response_mask: ArrayLike) -> jax.Array:
    """r*(x, y) of the module docstring; [..., T] -> [...] float32."""
    parts = split_rows(tokens, response_mask, PROMPT_LENGTH, MAX_RESPONSE_LENGTH, VOCAB_SIZE)
    gold = gold_tables()
    relevance = prompt_mean(gold.relevance, parts.prompt, parts.prompt_mask)
    values = jnp.asarray(gold.token_value, jnp.float32) + relevance  # w_x [..., V]
    # Σ_b w_x(b) 1[c_b ≥ 1] = Σ_t w_x(y_t) 1[y_t does not occur before t]; the rest repeat.
    same = parts.response[..., :, None] == parts.response[..., None, :]  # [..., t, s]
    earlier = jnp.tril(jnp.ones(same.shape[-2:], bool), k=-1)
    seen_before = (same & earlier & (parts.content[..., None, :] > 0)).any(-1)
    first = parts.content * ~seen_before
    distinct_value = (first * jnp.take_along_axis(values, parts.response, axis=-1)).sum(-1)
    repeats = (parts.content - first).sum(-1)
    bigram_bonus = jnp.asarray(gold.bigram_bonus, jnp.float32)
    pair_bonus = bigram_bonus[parts.response[..., :-1], parts.response[..., 1:]]  # B[y_{t-1}, y_t]
    bigrams = (pair_bonus * parts.content[..., :-1] * parts.content[..., 1:]).sum(-1)
    return distinct_value + bigrams - REPEAT_COST * repeats


@jax.jit
def generative_logprob(tokens: ArrayLike, response_mask: ArrayLike) -> jax.Array:
    """log p_gen(y | x) of the hidden chain; [..., T] -> [...] float32."""
    parts = split_rows(tokens, response_mask, PROMPT_LENGTH, MAX_RESPONSE_LENGTH, VOCAB_SIZE)
    return chain_logprob(chain(), parts)


class Preferences(NamedTuple):
    """Bradley–Terry labels of pairs: `a_preferred` bool [...], `prob_a_preferred` float32 [...]."""

    a_preferred: jax.Array
    prob_a_preferred: jax.Array


@jax.jit
def preference_pairs(
    tokens_a: ArrayLike,
    response_mask_a: ArrayLike,
    tokens_b: ArrayLike,
    response_mask_b: ArrayLike,
    key: jax.Array,
    temperature: ArrayLike = 1.0,
) -> Preferences:
    """Labels a ≻ b ~ Bernoulli(σ((r*(a) − r*(b)) / τ)): the Bradley–Terry model of the gold reward.

    Bradley & Terry (1952), "Rank analysis of incomplete block designs". A hidden gold reward
    that labels the proxy's training pairs is the synthetic setup of Gao, Schulman & Hilton
    (2023), "Scaling Laws for Reward Model Overoptimization". Rows a and b of one index
    should share the prompt. τ > 0 is traced, so a sweep over it does not recompile.
    Shapes: tokens and masks [..., T]; outputs [...].
    """
    if jnp.shape(tokens_a) != jnp.shape(tokens_b):
        raise ValueError(
            f"tokens_a {jnp.shape(tokens_a)} and tokens_b {jnp.shape(tokens_b)} must have the same shape."
        )
    margin = gold_reward(tokens_a, response_mask_a) - gold_reward(tokens_b, response_mask_b)
    prob = jax.nn.sigmoid(margin / jnp.asarray(temperature, jnp.float32))
    return Preferences(jax.random.bernoulli(key, prob), prob)


class PreferenceCorpus(NamedTuple):
    """Labelled pairs of responses to the same prompts: the preferred and the other row."""

    chosen: Sequences
    rejected: Sequences


def preference_corpus(num: int, seed: int, temperature: float = 1.0) -> PreferenceCorpus:
    """`num` pairs: a fresh prompt, two independent responses of the hidden chain, a BT label.

    Training data for a proxy reward model: pairs from the reference process, labelled by
    ``preference_pairs`` with key ``jax.random.key(seed)`` and temperature τ; the preferred
    row of each pair goes to `chosen`.
    """
    check_count(num)
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be positive.")
    rng = task_rng(_TASK_ID, _PREFERENCE_STREAM, seed)
    pair_prompts = _sample_prompts(num, rng)
    first = layout(pair_prompts, sample_chain(chain(), pair_prompts, rng))
    second = layout(pair_prompts, sample_chain(chain(), pair_prompts, rng))
    key = jax.random.key(seed)
    labels = preference_pairs(
        first.tokens, first.response_mask, second.tokens, second.response_mask, key, temperature
    )
    first_wins = np.asarray(labels.a_preferred)[:, None]
    pick = lambda when_first, when_second: np.where(first_wins, when_first, when_second)
    chosen = Sequences(*(pick(f, s) for f, s in zip(first, second)))
    rejected = Sequences(*(pick(s, f) for f, s in zip(first, second)))
    return PreferenceCorpus(chosen, rejected)


TASK = SyntheticTask(
    name="synthetic_language",
    vocab_size=VOCAB_SIZE,
    prompt_length=PROMPT_LENGTH,
    max_response_length=MAX_RESPONSE_LENGTH,
    prompts=prompts,
    pretraining_corpus=pretraining_corpus,
    reward=programmatic_reward(gold_reward),
    generative_logprob=generative_logprob,
)
