"""Tasks: what every task has (`Task`) and the built-in synthetic tasks (`SyntheticTask`).

A :class:`Task` is what every task has: its static shape (vocabulary, prompt length, response
length, EOS id) and its prompts,

    prompts(split, num, seed)       -> Prompts     deterministic prompt sets, 'train' / 'eval'

(the pretrained checkpoint's task, bond/tasks/pretrained.py, is one). A built-in task is a
:class:`SyntheticTask`, a Task with the hidden process that writes its data and a programmatic
reward:

    pretraining_corpus(num, seed)   -> Sequences   prompt + "natural" response, for the reference
    reward(params, responses)       -> [N]         a RewardFn (bond/models/reward.py): float32,
                                                   jittable, deterministic; it reads no params
    generative_logprob(tokens, response_mask) -> [...]   exact log p_gen(y | x) of the hidden
                                                   process that wrote the corpus

Token layout (the codebase's one convention): id 0 is BOS/EOS/PAD; prompts are left-padded
to `prompt_length` with `prompt_mask` (1 = real token); the response starts at index
`prompt_length`; `response_mask` is 1 on every response token up to and including the first
EOS. Prompts never contain token 0, so a prompt's mask is recoverable as `prompt != 0`.

Both built-in tasks draw responses from the same family of hidden processes, a
prompt-conditioned Markov chain (:class:`PromptConditionedChain`):

    p(y_t = b | y_<t, x) = softmax_b( S[y_{t-1}, b] + c(x)[b] + e_t · 1[b = 0] ),
    c(x) = (1/|x|) Σ_j A[x_j, :],      y_0 = x_|x| (the last prompt token),

stopped at the first EOS (b = 0) or after L tokens. S is a token-to-token "syntax", A makes
the response depend on every prompt token, and the EOS logit e_t grows with t so that
lengths vary. The reference policy is pretrained on samples of this chain; the reward is a
separate function, so aligning the policy means moving it away from the chain.

Use ``get_task(name)`` with a name from ``TASK_NAMES``; the modules ``toy_language``
(enumerable, the default) and ``synthetic_language`` (larger, with a hidden gold reward for
reward-model over-optimization studies) document their processes and rewards.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

if TYPE_CHECKING:
    from bond.models.reward import RewardFn

EOS_ID = 0
SPLITS = ("train", "eval")
TASK_NAMES = ("toy_language", "synthetic_language")
DEFAULT_TASK = "toy_language"


class Prompts(NamedTuple):
    """A prompt batch: `tokens [num, P]` int32 left-padded with 0, `mask [num, P]` int32."""

    tokens: np.ndarray
    mask: np.ndarray


class Sequences(NamedTuple):
    """Prompt + response rows in the codebase layout, all `[num, P + L]`.

    tokens int32 (0 after EOS); attention_mask int32 (1 on real prompt tokens and on
    response tokens up to and including EOS); response_mask float32 (1 on response tokens
    up to and including EOS).
    """

    tokens: np.ndarray
    attention_mask: np.ndarray
    response_mask: np.ndarray


@dataclasses.dataclass(frozen=True)
class Task:
    """What every task has: its static shape and its prompts (see the module docstring)."""

    name: str
    vocab_size: int
    prompt_length: int
    max_response_length: int
    prompts: Callable[[str, int, int], Prompts]
    eos_id: int = EOS_ID

    @property
    def sequence_length(self) -> int:
        """T = P + L, the length of a prompt + response row."""
        return self.prompt_length + self.max_response_length


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyntheticTask(Task):
    """A built-in task: a Task with its hidden process (corpus, exact log-probability) and its
    programmatic reward (see the module docstring)."""

    pretraining_corpus: Callable[[int, int], Sequences]
    reward: RewardFn
    generative_logprob: Callable[[ArrayLike, ArrayLike], jax.Array]


def programmatic_reward(reward: Callable[[ArrayLike, ArrayLike], jax.Array]) -> RewardFn:
    """The RewardFn of a reward computed from the tokens and the response mask alone, `reward(tokens,
    response_mask)` [..., T] → [...]: it reads no params and no attention mask (a prompt's padding
    is 0 in its tokens). Like `reward`, it accepts rows with any leading shape."""

    def reward_fn(params, responses) -> jax.Array:
        del params
        return reward(responses.tokens, responses.response_mask)

    return reward_fn


def get_task(name: str) -> SyntheticTask:
    """The built-in task called `name` (one of TASK_NAMES)."""
    if name not in TASK_NAMES:
        raise ValueError(f"task={name!r} is not a built-in task; use one of {TASK_NAMES}.")
    return importlib.import_module(f"{__name__}.{name}").TASK


# ----------------------------------------------------------------------------------------
# Argument checks and seeding shared by the tasks.


def check_split(split: str) -> None:
    """Raises a ValueError unless `split` is one of SPLITS."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a prompt split; use one of {SPLITS}.")


def check_count(num: int, name: str = "num") -> None:
    """Raises a ValueError naming `name` unless `num` is a non-negative integer."""
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 0:
        raise ValueError(f"{name}={num!r} must be a non-negative integer.")


def task_rng(task_id: int, stream: int, seed: int) -> np.random.Generator:
    """numpy Generator for (task, stream, seed); distinct streams never share draws.

    Built on SeedSequence([task_id, stream, seed]), so e.g. the 'train' and 'eval' prompts of
    one seed, and the corpus, are independent.
    """
    check_count(seed, "seed")
    return np.random.default_rng([task_id, stream, int(seed)])


# ----------------------------------------------------------------------------------------
# Layout: prompts + responses -> codebase rows; rows -> prompt / response parts (jittable).


def left_pad(rows: Sequence[Sequence[int]], length: int) -> Prompts:
    """Left-pads token rows (content ids >= 1) with 0 to `length`."""
    tokens = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        if not 1 <= len(row) <= length:
            raise ValueError(f"prompt {list(row)} must have 1..{length} tokens.")
        tokens[i, length - len(row) :] = row
    return Prompts(tokens, (tokens != EOS_ID).astype(np.int32))


def counted_response_mask(responses: np.ndarray) -> np.ndarray:
    """1 on response tokens up to and including the first EOS, else 0 ([num, L] float32)."""
    is_eos = responses == EOS_ID
    eos_before = np.cumsum(is_eos, axis=-1) - is_eos  # number of EOS strictly before t
    return (eos_before == 0).astype(np.float32)


def layout(prompts: Prompts, responses: np.ndarray) -> Sequences:
    """Concatenates prompts and responses into the codebase layout (see Sequences)."""
    responses = np.asarray(responses, np.int32)
    if responses.ndim != 2 or responses.shape[0] != prompts.tokens.shape[0]:
        raise ValueError(
            f"responses {responses.shape} must be [num, L] with num = {prompts.tokens.shape[0]} prompts."
        )
    counted = counted_response_mask(responses)
    responses = np.where(counted > 0, responses, EOS_ID).astype(np.int32)
    tokens = np.concatenate([prompts.tokens, responses], axis=-1)
    prompt_part = np.zeros(prompts.tokens.shape, np.float32)
    response_mask = np.concatenate([prompt_part, counted], axis=-1)
    attention_mask = np.concatenate([prompts.mask, counted.astype(np.int32)], axis=-1)
    return Sequences(tokens, attention_mask.astype(np.int32), response_mask)


class Parts(NamedTuple):
    """A row batch split at P: prompt ids and mask, response ids, counted and content masks."""

    prompt: jax.Array  # [..., P] int32
    prompt_mask: jax.Array  # [..., P] float32, prompt != 0
    response: jax.Array  # [..., T - P] int32
    counted: jax.Array  # [..., T - P] float32, response_mask on the response part
    content: jax.Array  # [..., T - P] float32, counted and not EOS


def split_rows(
    tokens: ArrayLike, response_mask: ArrayLike, prompt_length: int, max_response_length: int, vocab_size: int
) -> Parts:
    """Validates a `tokens [..., T]` / `response_mask [..., T]` pair and splits it at P.

    Responses are contiguous from index P (the layout convention), so response position t
    (0-based) is index P + t. Token ids are clipped into [0, V) so that table lookups in
    jitted rewards never read out of bounds; check ids on the host if that matters.
    """
    tokens = jnp.asarray(tokens)
    response_mask = jnp.asarray(response_mask)
    if tokens.ndim < 1 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array [..., T]; got {tokens.dtype} {tokens.shape}.")
    if response_mask.shape != tokens.shape:
        raise ValueError(
            f"response_mask shape {response_mask.shape} must equal tokens shape {tokens.shape}."
        )
    length = tokens.shape[-1]
    if not prompt_length < length <= prompt_length + max_response_length:
        raise ValueError(
            f"tokens has T={length}; this task needs prompt_length + 1 <= T <= "
            f"prompt_length + max_response_length = {prompt_length + max_response_length}."
        )
    tokens = jnp.clip(tokens.astype(jnp.int32), 0, vocab_size - 1)
    prompt, response = tokens[..., :prompt_length], tokens[..., prompt_length:]
    counted = response_mask[..., prompt_length:].astype(jnp.float32)
    content = counted * (response != EOS_ID)
    return Parts(prompt, (prompt != EOS_ID).astype(jnp.float32), response, counted, content)


def prompt_mean(table: ArrayLike, prompt: jax.Array, prompt_mask: jax.Array) -> jax.Array:
    """(1/|x|) Σ_j table[x_j, :] over the real prompt tokens: [..., P] -> [..., V]."""
    rows = jnp.asarray(table, jnp.float32)[prompt] * prompt_mask[..., None]
    return rows.sum(-2) / jnp.maximum(prompt_mask.sum(-1, keepdims=True), 1.0)


# ----------------------------------------------------------------------------------------
# The hidden generative process of both tasks.


@dataclasses.dataclass(frozen=True, eq=False)
class PromptConditionedChain:
    """p(y_t = b | y_<t, x) = softmax_b(S[y_{t-1}, b] + c(x)[b] + e_t 1[b = 0]).

    transition: S [V, V], row a = previous token, S[:, 0] = 0 (EOS enters through e_t).
    prompt_affinity: A [V, V], c(x) = mean_j A[x_j, :], A[:, 0] = 0.
    eos_logits: e [L], the EOS logit at response position t = 1..L.
    """

    transition: np.ndarray  # float32, as are the others
    prompt_affinity: np.ndarray
    eos_logits: np.ndarray

    @property
    def max_length(self) -> int:
        return len(self.eos_logits)


def sample_categorical(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row of softmax(logits) by inverting the CDF with one uniform per row."""
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    cdf = np.cumsum(weights, axis=-1)
    threshold = rng.random(logits.shape[:-1])[..., None] * cdf[..., -1:]
    index = (cdf <= threshold).sum(axis=-1)
    return np.minimum(index, logits.shape[-1] - 1).astype(np.int32)


def sample_chain(chain: PromptConditionedChain, prompts: Prompts, rng: np.random.Generator) -> np.ndarray:
    """Draws one response per prompt: `[num, L]` int32, 0 from the first EOS on."""
    tokens = prompts.tokens
    num, vocab_size = tokens.shape[0], chain.transition.shape[0]
    prompt_counts = np.zeros((num, vocab_size), np.float32)
    np.add.at(prompt_counts, (np.arange(num)[:, None], tokens), prompts.mask.astype(np.float32))
    context = prompt_counts @ chain.prompt_affinity / np.maximum(prompt_counts.sum(1, keepdims=True), 1.0)
    transition = chain.transition
    eos_indicator = (np.arange(vocab_size) == EOS_ID).astype(np.float32)
    previous = tokens[:, -1].copy()  # left padding: the last column is the last prompt token
    responses = np.zeros((num, chain.max_length), np.int32)
    alive = np.ones(num, bool)
    for t in range(chain.max_length):
        logits = transition[previous] + context + np.float32(chain.eos_logits[t]) * eos_indicator
        token = sample_categorical(logits, rng)
        responses[:, t] = np.where(alive, token, EOS_ID)
        alive &= token != EOS_ID
        previous = np.where(alive, token, previous)
    return responses


def chain_logprob(chain: PromptConditionedChain, parts: Parts) -> jax.Array:
    """log p(y | x) = Σ_t counted_t · log p(y_t | y_<t, x) under the chain, jittable."""
    context = prompt_mean(chain.prompt_affinity, parts.prompt, parts.prompt_mask)  # [..., V]
    previous = jnp.concatenate([parts.prompt[..., -1:], parts.response[..., :-1]], axis=-1)
    num_steps = parts.response.shape[-1]
    eos = jnp.asarray(chain.eos_logits[:num_steps], jnp.float32)[:, None] * jax.nn.one_hot(
        EOS_ID, chain.transition.shape[0]
    )
    logits = jnp.asarray(chain.transition, jnp.float32)[previous] + context[..., None, :] + eos
    logp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logp, parts.response[..., None], axis=-1)[..., 0]
    return (chosen * parts.counted).sum(-1)
