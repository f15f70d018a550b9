"""Population training: many runs that differ only in traced hyperparameters, as one jitted program.

A sweep over β, γ, η, the learning rate (or its scale) and the seed never changes a compiled
shape: those values enter `train.make_train_step`'s step as traced arrays (`train.hparams`, the
seed key). So P such runs are one program: the step is vmapped over a leading population axis of
the training state, the hyperparameters, the seed key and the per-seed reference-sample cache
(`train.build_reference_cache`; None for algorithms without reference samples), while the prompts
and the reference parameters are shared,

    step_P(state[P], ref_params, prompts, prompt_mask, prompt_rows, hp[P], seed_key[P], ref_cache[P])
        = vmap(step, in_axes=(0, None, None, None, None, 0, 0, 0)),

and every member starts from the same reference (`train.init_state`, broadcast P times). Member i
of the population computes exactly what `train.run(configs[i])` computes, so its metrics match
the separate run's (to float rounding: the vmapped matmuls are batched, see
tests/test_population.py). On a mesh the population axis is split over the 'data' axis
(NamedSharding with PartitionSpec('data') on the leading axis; prompts and reference replicated):
each device trains whole members, and the population is padded with copies of its last member to
a multiple of the data-axis size (the copies are computed and discarded).

Each member writes into its own workdir exactly what a separate `train.run` writes there —
config.json, metrics.jsonl, TensorBoard events, checkpoints/ (the member's own state, restorable by
`train.run`), summary.json, plots/ — so a sweep's results table reads both modes alike, and a
point started in one mode can be resumed in the other. A killed population resumes from the
newest step at which every member has a checkpoint. A member whose loss becomes NaN/inf stops
being written (no metrics, checkpoints or summary after its last good checkpoint) and is reported
with the message `train.run` would raise; the other members train on.

Population-capable fields: `POPULATION_FIELDS`. Anything else that differs between members
(shapes, the algorithm, N of a best-of-N plan, the optimizer's clipping, step counts, ...) would
need its own program; `check_population` says which field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from bond import sharding, stages, train
from bond.checkpoint import Checkpointer, abstract_like, common_steps, install_sigterm_handler, restore_newest_common
from bond.metrics import MetricWriter, NonFiniteLossError, Progress
from bond.tasks.prompts import load_prompts, read_prompt_batch
from bond.validation import validate

# Config fields that enter the step only as traced values: `seed` through the seed key, the rest
# through `train.hparams`. (config.algo.n, num_samples and num_ref_samples are in hparams too, but
# they also size the sampling plan, so they are not population-capable.)
POPULATION_FIELDS: tuple[str, ...] = (
    "seed",
    "learning_rate",
    "lr_scale",
    "anchor.eta",
    "algo.beta",
    "algo.gamma",
    "algo.kl_coef",
    "algo.pref_beta",
    "algo.wind_eta",
    "algo.wind_beta",
    "algo.target_temperature",
    "algo.bonbon_alpha",
)

# Fields that change what a run writes, never what it computes: members may differ in them.
_IGNORED_FIELDS: tuple[str, ...] = ("plots",)


# ---------------------------------------------------------------------------------------------
# Which configs can share one program


def flatten_config(config: ml_collections.ConfigDict | Mapping) -> dict[str, Any]:
    """{'a.b.c': value} for every leaf of a (nested) config."""
    flat: dict[str, Any] = {}
    items = config.items() if hasattr(config, "items") else dict(config).items()
    for key, value in items:
        if isinstance(value, (ml_collections.ConfigDict, Mapping)):
            flat.update({f"{key}.{k}": v for k, v in flatten_config(value).items()})
        else:
            flat[key] = value
    return flat


def varied_fields(configs: Sequence[ml_collections.ConfigDict]) -> dict[str, list[Any]]:
    """The config fields whose values are not the same in every config: {field: [value per config]}."""
    flats = [flatten_config(c) for c in configs]
    fields = sorted(set().union(*flats))
    missing = object()
    varied = {}
    for field in fields:
        values = [f.get(field, missing) for f in flats]
        if any(v is missing for v in values):
            raise ValueError(
                f"config field {field!r} exists in some configs and not in others; give every config the same fields."
            )
        if any(v != values[0] for v in values[1:]):
            varied[field] = values
    return varied


def check_population(configs: Sequence[ml_collections.ConfigDict]) -> None:
    """Raises ValueError naming the first field that keeps `configs` from training as one population.

    They can when they differ only in `POPULATION_FIELDS` (and in `plots`: each member draws its
    own plots or not).
    """
    if not configs:
        raise ValueError("configs is empty; a population needs at least one member config.")
    for field, values in varied_fields(configs).items():
        if field not in POPULATION_FIELDS and field not in _IGNORED_FIELDS:
            raise ValueError(
                f"config.{field} differs between population members ({sorted(set(map(repr, values)))}); a "
                f"population may vary only {POPULATION_FIELDS}. Run these configs as separate processes "
                f"(bond.sweep mode='processes')."
            )


# ---------------------------------------------------------------------------------------------
# Stacked state, hyperparameters and keys


def padded_size(size: int, mesh: jax.sharding.Mesh) -> int:
    """`size` rounded up to a multiple of the mesh's 'data' axis (the population's shards)."""
    data = mesh.shape["data"]
    return math.ceil(size / data) * data


def pad_members(members: Sequence[Any], size: int) -> list[Any]:
    """`members` (configs, states, ...) followed by copies of the last one, `size` in all."""
    if size < len(members):
        raise ValueError(f"size={size} is smaller than the {len(members)} members; pass size >= len(members).")
    return list(members) + [members[-1]] * (size - len(members))


def stack_trees(trees: Sequence[Any]) -> Any:
    """One pytree whose leaves have a new leading axis: leaf[i] = trees[i]'s leaf.

    Built in host memory (numpy), so that assembling a population compiles nothing; place it
    with `jax.device_put`.
    """
    return jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *trees)


def broadcast_tree(tree: Any, size: int) -> Any:
    """`size` copies of every leaf along a new leading axis, in host memory (as `stack_trees`)."""
    return jax.tree.map(lambda x: np.repeat(np.asarray(x)[None], size, axis=0), tree)


@jax.jit
def member(tree: Any, index: jax.typing.ArrayLike) -> Any:
    """Member `index` of a population pytree (every leaf indexed on its leading axis); one
    compiled program per tree, whatever the index."""
    return jax.tree.map(lambda x: x[index], tree)


def population_hparams(configs: Sequence[ml_collections.ConfigDict]) -> dict[str, np.ndarray]:
    """`train.hparams` of every config, stacked: {name: [P] float32}."""
    return stack_trees([train.hparams(c) for c in configs])


def population_seed_keys(configs: Sequence[ml_collections.ConfigDict]) -> np.ndarray:
    """PRNGKey(config.seed) of every config, stacked: [P, 2] uint32 (what `train.run` uses)."""
    return stack_trees([jax.random.PRNGKey(c.seed) for c in configs])


def population_reference_cache(
    setup: train.Setup, ref_params: Any, prompt_source: Sequence, configs: Sequence[ml_collections.ConfigDict]
) -> Any:
    """Every member's `train.build_reference_cache` (drawn from its seed, as `train.run` does), stacked;
    None when the run draws no cached reference samples. Members with the same seed share one draw."""
    if not train.uses_reference_cache(setup):
        return None
    by_seed = {}
    for seed in dict.fromkeys(config.seed for config in configs):
        by_seed[seed] = train.build_reference_cache(setup, ref_params, prompt_source, train.reference_cache_key(seed))
    return stack_trees([by_seed[config.seed] for config in configs])


def init_population(setup: train.Setup, ref_params: Any, size: int) -> train.TrainState:
    """`size` copies of `train.init_state` (in host memory): every member starts at the reference."""
    return broadcast_tree(train.init_state(setup, ref_params), size)


# ---------------------------------------------------------------------------------------------
# The population step


def make_population_step(setup: train.Setup) -> Callable:
    """vmap of `train.make_train_step(setup)` over (state, hp, seed_key, ref_cache); the rest shared.

    (state[P], ref_params, prompts, prompt_mask, prompt_rows, hp[P], seed_key[P], ref_cache[P])
    → (state[P], metrics[P]).
    """
    return jax.vmap(train.make_train_step(setup), in_axes=(0, None, None, None, None, 0, 0, 0))


def population_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """The leading (population) axis split over the mesh's 'data' axis; every other axis replicated."""
    return NamedSharding(mesh, PartitionSpec("data"))


def compile_population_step(setup: train.Setup, ref_sharding: Any) -> Callable:
    """jax.jit of the population step: members split over 'data', the state donated.

    `ref_sharding`: the reference parameters' shardings (`train.state_shardings(...).params`, as
    `train.run` places them). The jitted function is kept for the life of the process, keyed by
    everything but the traced fields (`program_key`), so populations that differ only in traced
    values (a sweep's chunks, a resumed run) compile once per population size.
    """
    key = program_key(setup)
    if key not in _PROGRAMS:
        members = population_sharding(setup.mesh)
        rep = sharding.replicated(setup.mesh)
        _PROGRAMS[key] = sharding.jit_sharded(
            make_population_step(setup),
            in_shardings=(members, ref_sharding, rep, rep, rep, members, members, members),
            out_shardings=(members, members),
            donate_argnums=(0,),
        )
    return _PROGRAMS[key]


_PROGRAMS: dict[tuple, Callable] = {}


def program_key(setup: train.Setup) -> tuple:
    """What the population step's program depends on: the config without its traced fields (the
    cache folder included: it holds the reference and reward-model parameters the program is
    built around), the algorithm object and the mesh."""
    static = {k: v for k, v in flatten_config(setup.config).items() if k not in POPULATION_FIELDS and k != "plots"}
    return json.dumps(static, sort_keys=True, default=repr), id(setup.algorithm), setup.mesh


# ---------------------------------------------------------------------------------------------
# The population run


def common_resume_step(checkpointers: Sequence[Checkpointer]) -> int:
    """The newest step at which every checkpointer has a complete checkpoint (0 if there is none)."""
    return max(common_steps(checkpointers), default=0)


@dataclasses.dataclass
class _Member:
    """One member's files and fate during a population run."""

    config: ml_collections.ConfigDict
    workdir: Path
    writer: MetricWriter
    checkpointer: Checkpointer
    last_saved: int | None
    error: str | None = None


def run_population(
    configs: Sequence[ml_collections.ConfigDict],
    workdirs: Sequence[str | Path],
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Trains every config as one member of one population; member i writes into workdirs[i].

    Each member's files are those `train.run(configs[i], workdirs[i])` writes, with the same
    values (see the module docstring). Resumes from the newest step every member has a checkpoint
    of.

    Returns:
      one dict per member: the summary `train.run` returns ({"steps", "algorithm", "task",
      "before", "after"}); {"error": message} for a member whose loss became non-finite; or
      {"stopped_at": step} for every member if SIGTERM stopped the run (after saving).

    Raises:
      ValueError: the configs cannot share one program (`check_population`), or the number of
        workdirs differs from the number of configs, or two members share a workdir.
    """
    configs = [ml_collections.ConfigDict(c) for c in configs]
    workdirs = [Path(w) for w in workdirs]
    if len(configs) != len(workdirs):
        raise ValueError(f"got {len(configs)} configs and {len(workdirs)} workdirs; pass one workdir per config.")
    if len({w.resolve() for w in workdirs}) != len(workdirs):
        raise ValueError("workdirs must be distinct: every member writes its own metrics and checkpoints.")
    check_population(configs)
    for c in configs:
        validate(c)

    setup, ref_params = train.make_setup(configs[0], log)
    c = setup.config
    size = padded_size(len(configs), setup.mesh)
    padded = pad_members(configs, size)
    members_sharding = population_sharding(setup.mesh)

    members = []
    for config, workdir in zip(configs, workdirs):
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=1, default=str))
        checkpointer = Checkpointer(workdir / "checkpoints", keep=c.checkpoint.keep)
        members.append(_Member(config, workdir, MetricWriter(workdir), checkpointer, None))

    single = train.init_state(setup, ref_params)
    start, restored, _ = restore_newest_common([m.checkpointer for m in members], abstract_like(single), log) or (0, None, None)
    if start:
        state = stack_trees(pad_members(restored, size))
        log(f"Resumed {len(members)} members from their checkpoints at step {start}")
    else:
        state = broadcast_tree(single, size)
    state = jax.device_put(state, members_sharding)
    for m in members:
        m.writer.truncate_after(start)
        m.last_saved = start or None

    # The reference and each evaluated member live where `train.run` puts a run's parameters, so
    # evaluation runs the same compiled programs as a separate run.
    params_sharding = train.state_shardings(setup, single).params
    ref_params = jax.device_put(ref_params, params_sharding)
    hp = jax.device_put(population_hparams(padded), members_sharding)
    seed_keys = jax.device_put(population_seed_keys(padded), members_sharding)
    train_step = compile_population_step(setup, params_sharding)
    prompt_source = load_prompts(c.task, "train", stages.cache_root(c.cache_dir) / "tfds")
    ref_cache = population_reference_cache(setup, ref_params, prompt_source, padded)
    if ref_cache is not None:
        ref_cache = jax.device_put(ref_cache, members_sharding)
    evaluators: dict[int, train.Evaluator] = {}  # eval prompts and eval key depend on the seed only

    def evaluator(config: ml_collections.ConfigDict) -> train.Evaluator:
        if config.seed not in evaluators:
            member_setup = dataclasses.replace(setup, config=ml_collections.FrozenConfigDict(config))
            evaluators[config.seed] = train.Evaluator(member_setup, ref_params, train.eval_key(config.seed))
        return evaluators[config.seed]

    def alive() -> list[tuple[int, _Member]]:
        return [(i, m) for i, m in enumerate(members) if m.error is None]

    def evaluate(step: int) -> None:
        at_reference: dict[int, dict] = {}  # step 0: every member is the reference; once per seed
        for i, m in alive():
            if step == 0:
                if m.config.seed not in at_reference:
                    at_reference[m.config.seed] = evaluator(m.config)(ref_params)
                metrics = at_reference[m.config.seed]
            else:
                metrics = evaluator(m.config)(jax.device_put(member(state.params, i), params_sharding))
            m.writer.write(step, {f"eval/{k}": v for k, v in metrics.items()})

    def drop_nonfinite() -> None:
        """Stops writing members whose loss was NaN/inf, with the message train.run raises."""
        first_bad = np.asarray(jax.device_get(state.nonfinite_step))
        for i, m in alive():
            if first_bad[i] >= 0:
                m.error = str(NonFiniteLossError(int(first_bad[i]) + 1, {"loss": np.float32("nan")}, m.last_saved))
                log(f"{m.workdir}: {m.error}")

    def save(step: int) -> None:
        for i, m in alive():
            m.checkpointer.save(step, member(state, i))
            m.last_saved = step

    stop = install_sigterm_handler()
    progress = Progress(c.steps)
    if start == 0:
        evaluate(0)
    step = start
    try:
        while step < c.steps:
            if stop.stop_requested():
                drop_nonfinite()
                save(step)
                log(f"Stopped by SIGTERM after step {step}; saved a checkpoint of every member.")
                return [{"stopped_at": step} for _ in members]
            batch = read_prompt_batch(prompt_source, step * c.batch_size, c.batch_size)
            rows = (step * c.batch_size + np.arange(c.batch_size)) % len(prompt_source)
            state, metrics = train_step(state, ref_params, batch.tokens, batch.mask, rows, hp, seed_keys, ref_cache)
            step += 1
            if step % c.log_every == 0 or step == c.steps:
                host = {f"train/{k}": np.asarray(v) for k, v in jax.device_get(metrics).items()}
                drop_nonfinite()
                for i, m in alive():
                    m.writer.write(step, {k: float(v[i]) for k, v in host.items()})
                progress.update(step)
            if step % c.eval.every == 0 or step == c.steps:
                evaluate(step)
                progress.update(step)
            if step % c.checkpoint.every == 0 or step == c.steps:
                drop_nonfinite()
                save(step)
    finally:
        for m in members:
            m.checkpointer.wait_until_finished()
            m.checkpointer.close()
            m.writer.close()
        stop.close()

    return [_finish(m) for m in members]


def _finish(m: _Member) -> dict:
    """The member's summary.json (and plots), as `train.run` writes them; {"error": ...} for a failed member."""
    if m.error is not None:
        return {"error": m.error}
    return train.finish_run(m.workdir, m.config)
