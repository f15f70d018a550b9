"""Config validation: every error a user can cause, caught before anything compiles.

`validate(config)` raises `ConfigError` (a ValueError) whose message names the field and the
values it allows; bond.main prints it and exits with status 2, without a traceback.
"""

from __future__ import annotations

import math

import jax
import ml_collections

from bond import algorithms, sharding
from bond.losses.wind import VARIANTS as WIND_VARIANTS
from bond.tasks import TASK_NAMES

ANCHOR_KINDS = ("none", "hard", "ema")
PREFERENCE_KINDS = ("hard", "bradley_terry")
# Algorithms whose sampling plan or loss uses N of best-of-N.
USES_N = ("bond", "iterative_bond", "vbon", "bonbon")


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


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Checks every field the runner reads; raises ConfigError naming the first bad one."""
    _require(
        config.algorithm in algorithms.names(),
        f"config.algorithm={config.algorithm!r} is not registered; choose one of {algorithms.names()}.",
    )
    _require(config.task in TASK_NAMES, f"config.task={config.task!r} is not a built-in task; choose one of {TASK_NAMES}.")
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

    algo = config.algo
    if config.algorithm in USES_N:
        _require(_number(config, "algo.n") >= 2, f"config.algo.n={algo.n} must be >= 2 (N of best-of-N).")
        _integer(config, "algo.n", 2)
    beta = _number(config, "algo.beta")
    _require(0 <= beta <= 1, f"config.algo.beta={beta} must be in [0, 1] (the Jeffreys mix (1−β)·forward + β·backward).")
    _require(_number(config, "algo.gamma") >= 0, f"config.algo.gamma={algo.gamma} must be >= 0.")
    _integer(config, "algo.num_samples", 1)
    _integer(config, "algo.num_ref_samples", 1)
    _require(_number(config, "algo.kl_coef") >= 0, f"config.algo.kl_coef={algo.kl_coef} must be >= 0.")
    _require(_number(config, "algo.pref_beta") > 0, f"config.algo.pref_beta={algo.pref_beta} must be > 0.")
    _require(_number(config, "algo.wind_eta") > 0, f"config.algo.wind_eta={algo.wind_eta} must be > 0.")
    _require(_number(config, "algo.wind_beta") >= 0, f"config.algo.wind_beta={algo.wind_beta} must be >= 0.")
    _require(algo.wind_variant in WIND_VARIANTS, f"config.algo.wind_variant={algo.wind_variant!r} must be one of {WIND_VARIANTS}.")
    _require(algo.preference in PREFERENCE_KINDS, f"config.algo.preference={algo.preference!r} must be one of {PREFERENCE_KINDS}.")
    _require(_number(config, "algo.target_temperature") > 0, f"config.algo.target_temperature={algo.target_temperature} must be > 0.")
    alpha = _number(config, "algo.bonbon_alpha")
    _require(0 <= alpha <= 1, f"config.algo.bonbon_alpha={alpha} must be in [0, 1].")

    _require(config.anchor.kind in ANCHOR_KINDS, f"config.anchor.kind={config.anchor.kind!r} must be one of {ANCHOR_KINDS}.")
    eta = _number(config, "anchor.eta")
    _require(0 < eta <= 1, f"config.anchor.eta={eta} must be in (0, 1] (EMA θ_a ← (1−η)θ_a + ηθ).")
    _integer(config, "anchor.period", 1)
    _integer(config, "eval.every", 1)
    _integer(config, "eval.num_prompts", 1)
    _integer(config, "eval.num_samples", 1)
    _integer(config, "checkpoint.every", 1)
    _integer(config, "checkpoint.keep", 1)
    for name in ("num_layers", "d_model", "num_heads", "d_ff"):
        _integer(config, f"model.{name}", 1)
    _require(
        config.model.d_model % config.model.num_heads == 0,
        f"config.model.d_model={config.model.d_model} must be divisible by config.model.num_heads={config.model.num_heads}.",
    )
    if config.reward_model.use_proxy:
        _require(config.task == "synthetic_language", f"config.reward_model.use_proxy needs task 'synthetic_language' (a task with preference data), not {config.task!r}.")

    algorithm = algorithms.get_algorithm(config.algorithm)
    if algorithm.validate is not None:
        try:
            algorithm.validate(config.algo)
        except ValueError as e:
            raise ConfigError(str(e)) from None

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
    data_shards = shape[0] * shape[1]
    _require(
        config.batch_size % data_shards == 0,
        f"config.batch_size={config.batch_size} must be divisible by the data axes of config.mesh_shape={tuple(config.mesh_shape)} "
        f"({data_shards} batch shards); use a multiple of {data_shards}.",
    )
