"""The task 'pretrained': align a pretrained checkpoint on text prompts with HF reward / preference models.

`config.task = 'pretrained'` and `config.pretrained` (see bond/config_base.py) name the files:

    policy_path       HF checkpoint folder (config.json + safetensors): the policy starts here and
                      it is the reference π_ref too (no SFT stage)
    tokenizer_path    folder or file of the tokenizer ('' = policy_path)
    reward_path       HF sequence-classification checkpoint: r(x, y), the reward of every
                      algorithm (and, through Bradley–Terry or hard labels, WIND's preference)
    preference_path   a sequence-classification checkpoint used as a pair scorer (PairRM slot,
                      bond/models/preference.py): s(x ⊕ y ⊕ separator ⊕ y'); WIND then learns
                      from P(y ≻ y') = ½[σ(s(x, y, y')) + 1 − σ(s(x, y', y))]
    prompts           dict(source='tfds:xsum' | 'jsonl:/path' | 'parquet:/path', field, train_split,
                      eval_split, template, limit): the prompt sets (bond/tasks/text.py)

`load_pretrained_task(config, mesh)` loads all of it, the parameters placed onto `mesh` by the
checkpoint loader, and returns a :class:`PretrainedTask`: the `Task` the runner reads (vocabulary
and EOS id of the checkpoint, prompt length P = max_prompt_length, response length
L = max_new_tokens, eval prompts), the policy model and parameters, the judges' parameters (the
`judge_params` the runner passes into its jitted step as an argument) and the judges: the reward
model's `RewardFn` (on judge_params['reward']) and the pair scorer's `PairJudge` (on
judge_params['preference']).

The reward model reads the policy's token ids directly, so it must share the policy's tokenizer
(bond/validation.py checks that before anything is loaded).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bond.models.preference import PairJudge, pair_scorer_judge
from bond.models.reward import Responses, RewardFn, reward_model_fn
from bond.tasks import Prompts, Task, check_split
from bond.tasks.text import TokenizedPrompts, load_text_prompts
from bond.tokenizer import Tokenizer, load_tokenizer

TASK_NAME = "pretrained"
# Algorithms that can learn from a pair scorer's preference matrix (the rest need a reward model).
PREFERENCE_MODEL_ALGORITHMS = ("wind", "wind_self_play", "sppo")
PARAM_DTYPES = ("", "float32", "bfloat16")

@dataclasses.dataclass(frozen=True, eq=False)
class PretrainedTask:
    """A loaded 'pretrained' run: its task, tokenizer, policy, judges and prompt sets."""

    task: Task
    tokenizer: Tokenizer
    model: Any  # the policy's TransformerConfig
    params: Any  # the policy's (= the reference's) parameters
    judge_params: dict  # {'reward': ..., 'preference': ...}, the judges that are configured
    reward_fn: RewardFn  # on judge_params['reward'] (params None and every reward 0 without a reward model)
    preference_judge: Optional[PairJudge]  # on judge_params['preference'], or None
    train_prompts: TokenizedPrompts
    eval_prompts: TokenizedPrompts


def param_dtype(name: str):
    """The parameter dtype of config.pretrained.param_dtype: None ('' = as stored in the checkpoint) or a jnp dtype."""
    if name not in PARAM_DTYPES:
        raise ValueError(f"config.pretrained.param_dtype={name!r} must be one of {PARAM_DTYPES}.")
    return jnp.dtype(name) if name else None


def tokenizer_path(p: ml_collections.ConfigDict) -> str:
    """config.pretrained.tokenizer_path, or the policy's folder when it is empty."""
    return p.tokenizer_path or p.policy_path


def prompt_sets(p: ml_collections.ConfigDict, tokenizer: Tokenizer, eval_size: int) -> tuple[TokenizedPrompts, TokenizedPrompts]:
    """(train, eval) prompt sets of config.pretrained.prompts, tokenized once."""
    q = p.prompts
    load = lambda split, limit: load_text_prompts(
        q.source, q.field, split, tokenizer, p.max_prompt_length, chat=p.chat_template, system=p.system_prompt or None,
        template=q.template, limit=limit, data_dir=q.data_dir or None,
    )
    return load(q.train_split, q.limit or None), load(q.eval_split, eval_size)


def make_task(p: ml_collections.ConfigDict, tokenizer: Tokenizer, vocab_size: int, eval_prompts: TokenizedPrompts) -> Task:
    """The `Task` of a pretrained run: checkpoint vocabulary and EOS, lengths from the config, eval prompts.

    Its prompts('eval', num, seed) are the first `num` eval prompts (the seed does not pick
    among them, so every run of a config is evaluated on the same prompts).
    """

    def prompts(split: str, num: int, seed: int) -> Prompts:
        del seed
        check_split(split)
        if split != "eval":
            raise ValueError("a pretrained task's train prompts are a stream: read them by row with bond.tasks.prompts.read_prompt_rows.")
        return eval_prompts.batch(num)

    return Task(
        name=TASK_NAME,
        vocab_size=vocab_size,
        prompt_length=p.max_prompt_length,
        max_response_length=p.max_new_tokens,
        prompts=prompts,
        eos_id=tokenizer.eos_id,
    )


def no_reward(params, responses: Responses) -> jax.Array:
    """Runs without a reward model (WIND on a pair scorer): every reward is 0."""
    del params
    return jnp.zeros(responses.tokens.shape[:1], jnp.float32)


def check_lengths(model, p: ml_collections.ConfigDict, what: str, length: int) -> None:
    """Raises a ValueError naming the fields when `length` tokens exceed the model's max_len."""
    max_len = getattr(model, "max_len", None)
    if max_len is not None and length > max_len:
        raise ValueError(
            f"the {what} reads {length} tokens (from config.pretrained.max_prompt_length={p.max_prompt_length} and "
            f"max_new_tokens={p.max_new_tokens}) but its checkpoint accepts at most {max_len}; lower them."
        )


class ShapeOnlyPrompts(Sequence):
    """`num` prompts of length P, all padding: a prompt source with the shapes of a real one and no
    file behind it, for compiling a run ahead of time (`bond.dry_run`)."""

    def __init__(self, num: int, prompt_length: int):
        self.num, self.prompt_length = num, prompt_length

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"prompt": np.zeros(self.prompt_length, np.int32), "prompt_mask": np.ones(self.prompt_length, np.int32)}


# Train prompts a shape-only run assumes when config.pretrained.prompts.limit is 0 (xsum's train split).
SHAPE_ONLY_TRAIN_PROMPTS = 204_045


def abstract_pretrained_task(config: ml_collections.ConfigDict, mesh=None) -> PretrainedTask:
    """`load_pretrained_task` with shapes only: the policy and judges from their checkpoints' config.json
    or shape presets ("preset:gemma_2b", bond/models/presets), jax.ShapeDtypeStruct parameters with the
    loader's shardings, no tokenizer and shape-only prompts (`ShapeOnlyPrompts`: prompts.limit rows, or
    SHAPE_ONLY_TRAIN_PROMPTS). EOS is config.json's eos_token_id and the pair scorer's separator is
    taken as empty (neither changes a compiled shape beyond the separator's few tokens)."""
    from bond.models.pretrained import abstract_pretrained, read_shapes_config

    p = config.pretrained
    dtype = param_dtype(p.param_dtype)
    model, params = abstract_pretrained(p.policy_path, dtype=dtype, mesh=mesh)
    judge_params: dict = {}
    reward_fn: RewardFn = no_reward
    if p.reward_path:
        reward_model, judge_params["reward"] = abstract_pretrained(p.reward_path, dtype=dtype, mesh=mesh, reward_model=True)
        reward_fn = reward_model_fn(reward_model)
    preference_judge = None
    if p.preference_path:
        preference_model, judge_params["preference"] = abstract_pretrained(
            p.preference_path, dtype=dtype, mesh=mesh, reward_model=True)
        preference_judge = pair_scorer_judge(reward_model_fn(preference_model), p.max_prompt_length, [])
    eos = read_shapes_config(p.policy_path).get("eos_token_id") or 0
    eos = eos[0] if isinstance(eos, list) else eos
    eval_prompts = ShapeOnlyPrompts(config.eval.num_prompts, p.max_prompt_length)
    return PretrainedTask(
        task=Task(name=TASK_NAME, vocab_size=model.vocab_size, prompt_length=p.max_prompt_length,
                  max_response_length=p.max_new_tokens, prompts=lambda *_: None, eos_id=int(eos)),
        tokenizer=None,
        model=model,
        params=params,
        judge_params=judge_params,
        reward_fn=reward_fn,
        preference_judge=preference_judge,
        train_prompts=ShapeOnlyPrompts(p.prompts.limit or SHAPE_ONLY_TRAIN_PROMPTS, p.max_prompt_length),
        eval_prompts=eval_prompts,
    )


def load_pretrained_task(config: ml_collections.ConfigDict, mesh=None, log: Callable[[str], None] = print) -> PretrainedTask:
    """Loads tokenizer, policy, judges and prompts of `config.pretrained` (parameters onto `mesh`)."""
    from bond import models

    p = config.pretrained
    dtype = param_dtype(p.param_dtype)
    tokenizer = load_tokenizer(tokenizer_path(p), eos_token=p.eos_token or None)
    log(f"Loading the policy (and reference) from {p.policy_path}")
    model, params = models.load_pretrained(p.policy_path, dtype=dtype, mesh=mesh)
    check_lengths(model, p, "policy", p.max_prompt_length + p.max_new_tokens)
    judge_params: dict = {}
    reward_fn: RewardFn = no_reward
    if p.reward_path:
        log(f"Loading the reward model from {p.reward_path}")
        reward_model, judge_params["reward"] = models.load_reward_model(p.reward_path, dtype=dtype, mesh=mesh)
        check_lengths(reward_model, p, "reward model", p.max_prompt_length + p.max_new_tokens)
        reward_fn = reward_model_fn(reward_model)
    preference_judge = None
    if p.preference_path:
        log(f"Loading the pairwise preference model from {p.preference_path}")
        preference_model, judge_params["preference"] = models.load_reward_model(p.preference_path, dtype=dtype, mesh=mesh)
        separator = tokenizer.encode(p.preference_separator, add_special_tokens=False) if p.preference_separator else []
        check_lengths(preference_model, p, "preference model",
                      p.max_prompt_length + 2 * p.max_new_tokens + len(separator))
        preference_judge = pair_scorer_judge(reward_model_fn(preference_model), p.max_prompt_length, separator)
    train_prompts, eval_prompts = prompt_sets(p, tokenizer, config.eval.num_prompts)
    log(f"Prompts: {len(train_prompts)} train, {len(eval_prompts)} eval from {p.prompts.source}")
    return PretrainedTask(
        task=make_task(p, tokenizer, model.vocab_size, eval_prompts),
        tokenizer=tokenizer,
        model=model,
        params=params,
        judge_params=judge_params,
        reward_fn=reward_fn,
        preference_judge=preference_judge,
        train_prompts=train_prompts,
        eval_prompts=eval_prompts,
    )
