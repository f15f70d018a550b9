"""The toy language: the default task, small enough to enumerate every response.

Shape. Tokens 0..8: 0 is EOS/PAD, 1..8 are content. Prompts have 1 or 2 content tokens,
left-padded to P = 2. Responses have at most L = 5 tokens, so a prompt has exactly
Σ_{k=0}^{4} 8^k + 8^5 = 37,449 responses (k content tokens then EOS, or 5 content tokens
and no EOS): ``bond.exact.enumerate_responses(9, 5)`` lists them and `bond.exact` scores
all of them.

Prompts. The 8 + 64 = 72 possible prompts are split once (fixed permutation, seed 0 of the
task's prompt-pool stream) into an 'eval' pool of 16 and a 'train' pool of 56.
``prompts(split, num, seed)`` concatenates independent random permutations of the split's
pool, so every pooled prompt appears ⌊num/|pool|⌋ or ⌈num/|pool|⌉ times.

Hidden process (reference corpus). A prompt-conditioned Markov chain (bond.tasks):

    p(y_t = b | y_<t, x) = softmax_b( S[y_{t-1}, b] + c(x)[b] + e_t 1[b = 0] ),
    c(x) = (1/|x|) Σ_j A[x_j, :],   y_0 = x_|x|,   e_t = -1 + (t - 1),  t = 1..5,

with S[a, b] = Z, A[a, b] = Z' (standard normal draws, fixed seed; column 0 is 0). About
3% of responses are a bare EOS and 10–50% (by prompt) run to 5 tokens without one.
``pretraining_corpus`` draws prompts from the whole pool (train and eval) the same way as
``prompts`` and one response each from the chain.

Reward. With n(y) content tokens y_1..y_n (EOS excluded) and ρ = e^{−1/2},

    r(x, y) = Σ_{t=1}^{n} ρ^{t−1} u_x(y_t) + λ n(y),    u_x = (1/|x|) Σ_j W[x_j, :],  λ = 0.05,

with W[a, b] = 0.3 + Z'' (fixed seed). The weights ρ^{t−1} make the reward depend on the
order of the tokens; ρ is transcendental, so no polynomial identity in ρ ties two orders
(the golden ratio's ρ² = 1 − ρ would tie many), and in exact arithmetic no two responses
of a prompt tie. In float32 between 10^-4 and 5·10^-3 of a prompt's 37,449 values collide
by rounding. W is independent of S and A, so the reward is an alignment target the chain
does not already meet: on every eval prompt the chain's most likely response is not the
best one, the top 1% of responses by reward hold between 0.03% and 7% of the chain's mass,
and exact best-of-16 gains 1.3 to 2.3 standard deviations of reward over the chain.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from bond.tasks import (
    PromptConditionedChain,
    Prompts,
    Sequences,
    SyntheticTask,
    check_count,
    check_split,
    chain_logprob,
    layout,
    left_pad,
    programmatic_reward,
    prompt_mean,
    sample_chain,
    split_rows,
    task_rng,
)

VOCAB_SIZE = 9
PROMPT_LENGTH = 2
MAX_RESPONSE_LENGTH = 5
NUM_EVAL_PROMPTS = 16
POSITION_DISCOUNT = float(np.exp(-0.5))  # ρ; transcendental, see the module docstring
LENGTH_BONUS = 0.05  # λ

_TASK_ID = 1
_TABLE_STREAM, _POOL_STREAM, _TRAIN_STREAM, _EVAL_STREAM, _CORPUS_STREAM = range(5)
_SPLIT_STREAMS = {"train": _TRAIN_STREAM, "eval": _EVAL_STREAM}


@functools.cache
def _tables() -> tuple[PromptConditionedChain, np.ndarray]:
    rng = task_rng(_TASK_ID, _TABLE_STREAM, 0)
    normal = lambda scale: scale * rng.standard_normal((VOCAB_SIZE, VOCAB_SIZE))
    transition, affinity, values = normal(1.0), normal(1.0), 0.3 + normal(1.0)
    for table in (transition, affinity, values):
        table[:, 0] = 0.0  # column 0: EOS, never a content value
        table[0, :] = 0.0  # row 0: never a previous or prompt token
    eos_logits = -1.0 + 1.0 * np.arange(MAX_RESPONSE_LENGTH)
    f32 = lambda table: table.astype(np.float32)
    return PromptConditionedChain(f32(transition), f32(affinity), f32(eos_logits)), f32(values)


def chain() -> PromptConditionedChain:
    """The hidden process that writes the pretraining corpus."""
    return _tables()[0]


def token_values() -> np.ndarray:
    """W [V, V]: W[a, b] is the value of response token b for prompt token a."""
    return _tables()[1]


@functools.cache
def _pools() -> dict[str, Prompts]:
    content = range(1, VOCAB_SIZE)
    all_prompts = [(a,) for a in content] + list(itertools.product(content, repeat=2))
    order = task_rng(_TASK_ID, _POOL_STREAM, 0).permutation(len(all_prompts))
    eval_ids = sorted(order[:NUM_EVAL_PROMPTS])
    train_ids = sorted(order[NUM_EVAL_PROMPTS:])
    return {
        "eval": left_pad([all_prompts[i] for i in eval_ids], PROMPT_LENGTH),
        "train": left_pad([all_prompts[i] for i in train_ids], PROMPT_LENGTH),
        "all": left_pad(all_prompts, PROMPT_LENGTH),
    }


def prompt_pool(split: str) -> Prompts:
    """The distinct prompts of a split ('train': 56, 'eval': 16): 1-token ones first, each block sorted."""
    check_split(split)
    return _pools()[split]


def _draw_from_pool(pool: Prompts, num: int, rng: np.random.Generator) -> Prompts:
    size = len(pool.tokens)
    epochs = -(-num // size)
    index = np.concatenate([np.zeros(0, np.int64)] + [rng.permutation(size) for _ in range(epochs)])[:num]
    return Prompts(pool.tokens[index], pool.mask[index])


def prompts(split: str, num: int, seed: int) -> Prompts:
    """`num` prompts of `split`: successive random permutations of the split's pool."""
    check_split(split)
    check_count(num)
    return _draw_from_pool(prompt_pool(split), num, task_rng(_TASK_ID, _SPLIT_STREAMS[split], seed))


def pretraining_corpus(num: int, seed: int) -> Sequences:
    """`num` rows: a prompt from the whole pool, then one response of the hidden chain."""
    check_count(num)
    rng = task_rng(_TASK_ID, _CORPUS_STREAM, seed)
    corpus_prompts = _draw_from_pool(_pools()["all"], num, rng)
    return layout(corpus_prompts, sample_chain(chain(), corpus_prompts, rng))


@jax.jit
def reward(tokens: ArrayLike, response_mask: ArrayLike) -> jax.Array:
    """r(x, y) = Σ_t ρ^{t−1} u_x(y_t) + λ n(y) (module docstring); [..., T] -> [...] float32."""
    parts = split_rows(tokens, response_mask, PROMPT_LENGTH, MAX_RESPONSE_LENGTH, VOCAB_SIZE)
    values = prompt_mean(token_values(), parts.prompt, parts.prompt_mask)  # u_x [..., V]
    token_value = jnp.take_along_axis(values, parts.response, axis=-1)  # u_x(y_t)
    discount = jnp.asarray(POSITION_DISCOUNT, jnp.float32) ** jnp.arange(parts.response.shape[-1])
    return (parts.content * (discount * token_value + LENGTH_BONUS)).sum(-1)


@jax.jit
def generative_logprob(tokens: ArrayLike, response_mask: ArrayLike) -> jax.Array:
    """log p_gen(y | x) of the hidden chain; [..., T] -> [...] float32."""
    parts = split_rows(tokens, response_mask, PROMPT_LENGTH, MAX_RESPONSE_LENGTH, VOCAB_SIZE)
    return chain_logprob(chain(), parts)


TASK = SyntheticTask(
    name="toy_language",
    vocab_size=VOCAB_SIZE,
    prompt_length=PROMPT_LENGTH,
    max_response_length=MAX_RESPONSE_LENGTH,
    prompts=prompts,
    pretraining_corpus=pretraining_corpus,
    reward=programmatic_reward(reward),
    generative_logprob=generative_logprob,
)
