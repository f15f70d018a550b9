"""Config validation: every error a user can cause, caught before anything compiles.

`validate(config)` raises `ConfigError` (a ValueError) whose message names the field and the
values it allows; bond.main prints it and exits with status 2, without a traceback.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import ml_collections

from bond import algorithms, lora, sharding
from bond.metrics import wandb_problem
from bond.models.transformer import ATTENTIONS, REMAT_POLICIES
from bond.sampling import PLAIN_SAMPLING
from bond.tasks import TASK_NAMES

PRETRAINED_TASK = "pretrained"
ANCHOR_KINDS = ("none", "hard", "ema")


class ConfigError(ValueError):
    """A config value outside its allowed range; the message names the field and the fix."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _number(config, path: str) -> float:
    node = config
    for part in path.split("."):
        node = node[part]
    _require(
        isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node),
        f"config.{path}={node!r} must be a finite number.",
    )
    return float(node)


def _integer(config, path: str, minimum: int) -> int:
    value = _number(config, path)
    _require(value == int(value) and value >= minimum, f"config.{path}={value:g} must be an integer >= {minimum}.")
    return int(value)


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None, *, shapes_only: bool = False) -> None:
    """Checks every field the runner reads; raises ConfigError naming the first bad one.

    num_devices: the devices the mesh will span (default: this process's jax.device_count()), e.g. a
      TPU topology's when compiling for it ahead of time.
    shapes_only: a run compiled from shapes alone (`bond.dry_run`): the pretrained task's checkpoints
      may be shape presets and no tokenizer or prompt file is read.
    """
    _require(
        config.algorithm in algorithms.names(),
        f"config.algorithm={config.algorithm!r} is not registered; choose one of {algorithms.names()}.",
    )
    tasks = TASK_NAMES + (PRETRAINED_TASK,)
    _require(config.task in tasks, f"config.task={config.task!r} is not a task; choose one of {tasks}.")
    _integer(config, "steps", 1)
    _integer(config, "batch_size", 1)
    _integer(config, "seed", 0)
    _integer(config, "log_every", 1)
    _require(_number(config, "learning_rate") > 0, f"config.learning_rate={config.learning_rate} must be > 0.")
    _require(_number(config, "lr_scale") > 0, f"config.lr_scale={config.lr_scale} must be > 0.")
    _number(config, "grad_clip")
    _require(_number(config, "temperature") > 0, f"config.temperature={config.temperature} must be > 0.")
    _integer(config, "top_k", 0)
    top_p = _number(config, "top_p")
    _require(0 < top_p <= 1, f"config.top_p={top_p} must be in (0, 1].")
    _integer(config, "min_new_tokens", 0)

    _require(config.anchor.kind in ANCHOR_KINDS, f"config.anchor.kind={config.anchor.kind!r} must be one of {ANCHOR_KINDS}.")
    eta = _number(config, "anchor.eta")
    _require(0 < eta <= 1, f"config.anchor.eta={eta} must be in (0, 1] (EMA θ_a ← (1−η)θ_a + ηθ).")
    _integer(config, "anchor.period", 1)
    _integer(config, "eval.every", 1)
    _integer(config, "eval.num_prompts", 1)
    _integer(config, "eval.num_samples", 1)
    _integer(config, "checkpoint.every", 1)
    keep = _number(config, "checkpoint.keep")
    _require(
        keep == int(keep) and keep >= 2,
        f"config.checkpoint.keep={keep:g} must be an integer >= 2: when the newest checkpoint is damaged, "
        "the run resumes from the one before it.",
    )
    for name in ("num_layers", "d_model", "num_heads", "d_ff"):
        _integer(config, f"model.{name}", 1)
    _require(
        config.model.d_model % config.model.num_heads == 0,
        f"config.model.d_model={config.model.d_model} must be divisible by config.model.num_heads={config.model.num_heads}.",
    )
    _validate_memory(config)
    _validate_lora(config)
    if config.reward_model.use_proxy:
        _require(config.task == "synthetic_language", f"config.reward_model.use_proxy needs task 'synthetic_language' (a task with preference data), not {config.task!r}.")
    if config.task == PRETRAINED_TASK:
        (validate_pretrained_shapes if shapes_only else validate_pretrained)(config)
    wandb = wandb_problem(config.get("wandb"))
    _require(wandb is None, wandb)

    # The algorithm's own knobs, as it declares them (bond/algorithms.py).
    algorithm = algorithms.get_algorithm(config.algorithm)
    try:
        algorithm.check_config(algorithm.with_defaults(config.algo))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _require(isinstance(config.allow_biased_samples, bool),
             f"config.allow_biased_samples={config.allow_biased_samples!r} must be True or False.")
    if algorithm.needs_on_policy_samples and not config.allow_biased_samples:
        for field, plain in PLAIN_SAMPLING.items():
            _require(
                config[field] == plain,
                f"config.{field}={config[field]!r}: algorithm {config.algorithm!r} estimates its gradient from "
                f"samples of the policy itself, which config.{field} changes, so the estimate would be biased; "
                f"set config.{field}={plain!r} (or config.allow_biased_samples=True to accept the bias).",
            )

    available = jax.device_count() if num_devices is None else num_devices
    requested = _integer(config, "num_devices", 0)
    _require(
        requested <= available,
        f"config.num_devices={requested} but only {available} devices are available; use 0 (all) or at most {available}.",
    )
    devices = requested or available
    try:
        shape = sharding.resolve_mesh_shape(tuple(config.mesh_shape), devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh_shape: {e}") from None
    _require(
        config.memory.decode_weights in sharding.DECODE_WEIGHTS,
        f"config.memory.decode_weights={config.memory.decode_weights!r} must be one of {sharding.DECODE_WEIGHTS}.",
    )
    data_shards = shape[0] * shape[1]
    _require(
        config.batch_size % data_shards == 0,
        f"config.batch_size={config.batch_size} must be divisible by the data axes of config.mesh_shape={tuple(config.mesh_shape)} "
        f"({data_shards} batch shards); use a multiple of {data_shards}.",
    )
    _check_micro_batches(config, data_shards)


def _check_micro_batches(config: ml_collections.ConfigDict, data_shards: int) -> None:
    """config.memory.micro_batches divides the batch, and each micro-batch still splits over the batch shards."""
    count = _integer(config, "memory.micro_batches", 1)
    _require(
        config.batch_size % count == 0,
        f"config.memory.micro_batches={count} must divide config.batch_size={config.batch_size}; use a divisor of it.",
    )
    rows = config.batch_size // count
    _require(
        rows % data_shards == 0,
        f"config.memory.micro_batches={count} leaves {rows} prompts per micro-batch, which do not split over the "
        f"{data_shards} batch shards of config.mesh_shape={tuple(config.mesh_shape)}; use micro_batches such that "
        f"config.batch_size / micro_batches is a multiple of {data_shards}.",
    )


# ---------------------------------------------------------------------------------------------
# task='pretrained': files on disk, read without loading any weights.


def _hf_config(path: str, field: str) -> dict:
    """The config.json of the HF checkpoint folder `path` named by `field`; ConfigError if it is missing."""
    _require(bool(path), f"config.{field} is empty; set it to an HF checkpoint folder (config.json + *.safetensors).")
    folder = Path(path)
    _require(folder.is_dir(), f"config.{field}={path!r} is not a folder; point it at an HF checkpoint folder.")
    _require(
        (folder / "config.json").exists(),
        f"config.{field}={path!r} has no config.json; point it at the folder that holds config.json and the *.safetensors.",
    )
    try:
        return json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"config.{field}: {folder / 'config.json'} is not valid JSON ({e}).") from None


def _hf_value(hf_config: dict, *names: str):
    """The first of `names` in an HF config (or in its 'text_config', as multimodal checkpoints nest it)."""
    for scope in (hf_config, hf_config.get("text_config") or {}):
        for name in names:
            if isinstance(scope.get(name), int):
                return scope[name]
    return None


def _same_tokenizer(policy_tokenizer, path: str, field: str) -> None:
    """A judge folder's own tokenizer, if it has one, must give every token the policy's id."""
    from bond.tokenizer import TokenizerError, find_tokenizer_file, load_tokenizer

    try:
        find_tokenizer_file(path)
    except TokenizerError:
        return  # no tokenizer files next to the judge: it is assumed to share the policy's
    try:
        judge_tokenizer = load_tokenizer(path)
    except TokenizerError as e:
        raise ConfigError(f"config.{field}: {e}") from None
    _require(
        judge_tokenizer.vocabulary() == policy_tokenizer.vocabulary(),
        f"config.{field}={path!r} has a tokenizer that differs from the policy's (vocabulary of "
        f"{judge_tokenizer.vocab_size} vs {policy_tokenizer.vocab_size} tokens, or other ids for the same tokens): the "
        "judge reads the policy's token ids, so it needs a checkpoint trained with the policy's tokenizer.",
    )


def validate_pretrained_shapes(config: ml_collections.ConfigDict) -> None:
    """The checks of `validate_pretrained` that need no file beyond the checkpoints' config.json (or
    their shape presets): which judges are set, dtypes, lengths against the policy's positions."""
    from bond.models.pretrained import read_shapes_config
    from bond.tasks.pretrained import PARAM_DTYPES

    p = config.pretrained
    prompt_length = _integer(config, "pretrained.max_prompt_length", 1)
    new_tokens = _integer(config, "pretrained.max_new_tokens", 1)
    _require(p.param_dtype in PARAM_DTYPES, f"config.pretrained.param_dtype={p.param_dtype!r} must be one of {PARAM_DTYPES}.")
    _require(bool(p.reward_path or p.preference_path),
             "config.pretrained.reward_path and preference_path are both empty; set one (a shape preset will do).")
    for field in ("policy_path", "reward_path", "preference_path"):
        if field == "policy_path" or p[field]:
            try:
                hf = read_shapes_config(p[field])
            except ValueError as e:
                raise ConfigError(f"config.pretrained.{field}: {e}") from None
            max_len = _hf_value(hf, "max_position_embeddings", "n_positions")
            _require(max_len is None or prompt_length + new_tokens <= max_len,
                     f"config.pretrained.max_prompt_length + max_new_tokens = {prompt_length + new_tokens} exceeds the "
                     f"{max_len} positions of config.pretrained.{field}; lower them.")


def _validate_memory(config: ml_collections.ConfigDict) -> None:
    """config.memory's model-level choices (bond/models/transformer.py): remat, attention, vocabulary chunk."""
    memory = config.memory
    _require(memory.remat in REMAT_POLICIES,
             f"config.memory.remat={memory.remat!r} must be one of {tuple(REMAT_POLICIES)}.")
    _require(memory.attention in ATTENTIONS,
             f"config.memory.attention={memory.attention!r} must be one of {tuple(ATTENTIONS)}.")
    _require(memory.attention != "cudnn" or jax.default_backend() == "gpu",
             f"config.memory.attention='cudnn' needs NVIDIA GPUs, not {jax.default_backend()!r}; use 'dot_product'.")
    _integer(config, "memory.logprob_vocab_chunk", 0)


def _validate_lora(config: ml_collections.ConfigDict) -> None:
    """config.lora: rank >= 0, alpha >= 0, targets 'all' or known names (whether the model has them is
    checked when it is built, `bond.context.with_lora`)."""
    _integer(config, "lora.rank", 0)
    _require(isinstance(config.lora.alpha, (int, float)) and config.lora.alpha >= 0,
             f"config.lora.alpha={config.lora.alpha!r} must be a number >= 0 (0: alpha = rank).")
    try:
        lora.targets_of(config.lora.targets, gated_mlp=True)  # whether the model has a gate: when it is built
    except ValueError as e:
        raise ConfigError(str(e)) from None


def validate_pretrained(config: ml_collections.ConfigDict) -> None:
    """Checks config.pretrained against the files: checkpoints, tokenizer, vocabularies, lengths, prompts."""
    from bond.tasks.pretrained import PARAM_DTYPES, PREFERENCE_MODEL_ALGORITHMS, tokenizer_path
    from bond.tasks.text import FILE_KINDS, parse_source, read_inline
    from bond.tokenizer import TokenizerError, load_tokenizer

    p = config.pretrained
    prompt_length = _integer(config, "pretrained.max_prompt_length", 1)
    new_tokens = _integer(config, "pretrained.max_new_tokens", 1)
    _require(p.param_dtype in PARAM_DTYPES, f"config.pretrained.param_dtype={p.param_dtype!r} must be one of {PARAM_DTYPES}.")
    _require(
        config.algorithm in PREFERENCE_MODEL_ALGORITHMS or not p.preference_path,
        f"config.pretrained.preference_path is set but config.algorithm={config.algorithm!r} learns from rewards; "
        f"a pair scorer serves {PREFERENCE_MODEL_ALGORITHMS}. Clear preference_path or set reward_path.",
    )
    _require(
        bool(p.reward_path or p.preference_path),
        f"config.pretrained.reward_path is empty: config.algorithm={config.algorithm!r} needs a reward model "
        "(an HF sequence-classification checkpoint folder)"
        + (" or, for WIND, a pair scorer in config.pretrained.preference_path." if config.algorithm in PREFERENCE_MODEL_ALGORITHMS else "."),
    )

    policy = _hf_config(p.policy_path, "pretrained.policy_path")
    field = "pretrained.tokenizer_path" if p.tokenizer_path else "pretrained.policy_path"
    try:
        tokenizer = load_tokenizer(tokenizer_path(p), eos_token=p.eos_token or None)
    except TokenizerError as e:
        raise ConfigError(f"config.{field}: {e} (or set config.pretrained.tokenizer_path)") from None
    _require(
        not p.chat_template or tokenizer.chat_template is not None,
        f"config.pretrained.chat_template=True but the tokenizer at {tokenizer_path(p)!r} has no chat template; "
        "set it to False or use a checkpoint with one.",
    )
    policy_vocab = _hf_value(policy, "vocab_size")
    _require(policy_vocab is not None, f"config.pretrained.policy_path: {p.policy_path}/config.json has no vocab_size.")
    _require(
        tokenizer.vocab_size <= policy_vocab,
        f"the tokenizer of config.{field} has {tokenizer.vocab_size} tokens but the policy at "
        f"config.pretrained.policy_path embeds only {policy_vocab}; use the checkpoint's own tokenizer.",
    )
    max_positions = _hf_value(policy, "max_position_embeddings", "n_positions")
    _require(
        max_positions is None or prompt_length + new_tokens <= max_positions,
        f"config.pretrained.max_prompt_length + max_new_tokens = {prompt_length + new_tokens} exceeds the policy's "
        f"max_position_embeddings={max_positions}; lower them.",
    )
    for judge_field, path, length in (
        ("pretrained.reward_path", p.reward_path, prompt_length + new_tokens),
        ("pretrained.preference_path", p.preference_path, prompt_length + 2 * new_tokens),
    ):
        if not path:
            continue
        judge = _hf_config(path, judge_field)
        judge_vocab = _hf_value(judge, "vocab_size")
        _require(
            judge_vocab is not None and judge_vocab >= policy_vocab,
            f"config.{judge_field}={path!r} embeds {judge_vocab} tokens but the policy samples ids below {policy_vocab}: "
            "a vocabulary mismatch; use a judge trained with the policy's tokenizer.",
        )
        judge_positions = _hf_value(judge, "max_position_embeddings", "n_positions")
        _require(
            judge_positions is None or length <= judge_positions,
            f"config.{judge_field} reads {length} tokens per sequence (from config.pretrained.max_prompt_length and "
            f"max_new_tokens) but accepts at most {judge_positions}; lower them.",
        )
        _same_tokenizer(tokenizer, path, judge_field)

    q = p.prompts
    try:
        kind, location = parse_source(q.source)
    except ValueError as e:
        raise ConfigError(f"config.pretrained.prompts.source: {e}") from None
    _require(bool(q.field), "config.pretrained.prompts.field is empty; name the text field of the prompt records.")
    _require("{text}" in q.template, f"config.pretrained.prompts.template={q.template!r} must contain '{{text}}'.")
    _integer(config, "pretrained.prompts.limit", 0)
    if kind == "inline":
        try:
            read_inline(location)
        except ValueError as e:
            raise ConfigError(f"config.pretrained.prompts.source: {e}") from None
    if kind in FILE_KINDS:
        for split in {q.train_split, q.eval_split}:
            file = location.replace("{split}", split)
            _require(Path(file).exists(), f"config.pretrained.prompts.source: no {kind} file at {file!r} (split {split!r}).")
