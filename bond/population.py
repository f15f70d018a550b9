"""Population training: many runs that differ only in traced hyperparameters, as one jitted program.

A sweep over β, γ, η, the learning rate (or its scale) and the seed never changes a compiled
shape: those values enter the step (bond/step.py) as its `Traced` input (hyperparameters, seed
key, the reference samples drawn from that seed). So P such runs are one program: the step is
vmapped over a leading population axis of the training state and `Traced`, while `Batch` (the
prompts) and `Fixed` (reference and judges) are shared, as each declares (`population_axis`):

    step_P(state[P], batch, fixed, traced[P]) = vmap(step, in_axes=(0, None, None, 0)),

and every member starts from the same reference (the run context's initial state, broadcast P
times). The population is assembled by the same `bond.context.build_context` as a single run. Member i
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

from bond import lora, sharding
from bond.checkpoint import Checkpointer, abstract_like, install_sigterm_handler, restore_newest_common
from bond.context import RunContext, Setup, build_context, eval_key
from bond.evaluation import Evaluator
from bond.metrics import MetricWriter, NonFiniteLossError, Progress
from bond.plots import write_reference_front
from bond.step import Batch, Fixed, StepShardings, Traced, compute_params, make_train_step, model_params
from bond.train import finish_run, is_checkpoint_step, is_eval_step, is_logging_step
from bond.validation import validate

# Config fields that enter the step only as traced values: `seed` through the seed key, the rest
# through `bond.step.hparams`. (config.algo.n, num_samples and num_ref_samples are in hparams too, but
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
    "algo.sppo_eta",
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


# ---------------------------------------------------------------------------------------------
# The population step


def make_population_step(setup: Setup, per_member_batch: bool = False) -> Callable:
    """vmap of `bond.step.make_train_step(setup)` over the state and `Traced`; `Batch` and `Fixed` shared.

    (state[P], batch, fixed, traced[P]) → (state[P], metrics[P]).

    per_member_batch: each member trains on its own prompts, `Batch` with a leading population
      axis too (batch[P]); test-time adaptation (bond/test_time.py) gives each member one prompt.
    """
    batch_axis = 0 if per_member_batch else Batch.population_axis
    return jax.vmap(make_train_step(setup),
                    in_axes=(0, batch_axis, Fixed.population_axis, Traced.population_axis))


def population_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """The leading (population) axis split over the mesh's 'data' axis; every other axis replicated."""
    return NamedSharding(mesh, PartitionSpec("data"))


def population_shardings(context: RunContext) -> StepShardings:
    """Where a population's step inputs live: members (state, Traced) split over the mesh's 'data'
    axis, the prompts whole on every device, the reference and judges as in a single run; the
    reference samples' prompt axis (axis 1, padded to the batch shards) split over the batch axes
    other than 'data'."""
    mesh = context.setup.mesh
    members = population_sharding(mesh)
    prompt_axes = tuple(a for a in sharding.batch_axes() if a != "data" and mesh.shape[a] > 1)
    reference_samples = NamedSharding(mesh, PartitionSpec("data", prompt_axes or None))
    return dataclasses.replace(context.shardings, state=members, traced=Traced(members, members, reference_samples))


def compile_population_step(context: RunContext) -> Callable:
    """jax.jit of the population step: members split over 'data', the state donated.

    The jitted function is kept for the life of the process, keyed by everything but the traced
    fields (`program_key`), so populations that differ only in traced values (a sweep's chunks, a
    resumed run) compile once per population size.
    """
    key = program_key(context.setup)
    if key not in _PROGRAMS:
        shardings = population_shardings(context)
        _PROGRAMS[key] = sharding.jit_sharded(
            make_population_step(context.setup),
            in_shardings=shardings.inputs(),
            out_shardings=(shardings.state, shardings.state),
            donate_argnums=(0,),
        )
    return _PROGRAMS[key]


_PROGRAMS: dict[tuple, Callable] = {}


def program_key(setup: Setup) -> tuple:
    """What the population step's program depends on: the config without its traced fields (the
    cache folder included: it holds the reference and reward-model parameters the program is
    built around), the algorithm object and the mesh."""
    static = {k: v for k, v in flatten_config(setup.config).items() if k not in POPULATION_FIELDS and k != "plots"}
    return json.dumps(static, sort_keys=True, default=repr), id(setup.algorithm), setup.mesh


# ---------------------------------------------------------------------------------------------
# The population run


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

    context = build_context(configs[0], log, split_batch=False)
    setup, c = context.setup, context.config
    size = padded_size(len(configs), setup.mesh)
    padded = pad_members(configs, size)
    shardings = population_shardings(context)

    members = []
    for config, workdir in zip(configs, workdirs):
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=1, default=str))
        checkpointer = Checkpointer(workdir / "checkpoints", keep=c.checkpoint.keep)
        members.append(_Member(config, workdir, MetricWriter.for_run(workdir, config), checkpointer, None))

    abstract = abstract_like(context.state, context.shardings.state)
    meta = lora.checkpoint_meta(setup.model, context.fixed.reference)  # what a LoRA run's adapters adapt
    start, restored, metas = restore_newest_common([m.checkpointer for m in members], abstract, log) or (0, None, None)
    if start:
        for m, saved in zip(members, metas):
            lora.check_same_base(saved, meta, str(m.workdir / "checkpoints"))
        state = stack_trees(pad_members(restored, size))
        log(f"Resumed {len(members)} members from their checkpoints at step {start}")
    else:
        state = broadcast_tree(sharding.process_local(context.state), size)
    state = sharding.place(state, shardings.state)
    for m in members:
        m.writer.truncate_after(start if start else -1)  # a fresh start evaluates step 0 again
        m.last_saved = start or None

    # Each evaluated member lives where `train.run` puts a run's parameters, so evaluation runs
    # the same compiled programs as a separate run.
    params_sharding = context.shardings.state.params
    ref_params = context.local_reference
    traced = sharding.place(stack_trees([context.traced_for(config) for config in padded]), shardings.traced)
    train_step = compile_population_step(context)
    evaluators: dict[int, Evaluator] = {}  # eval prompts and eval key depend on the seed only

    def evaluator(config: ml_collections.ConfigDict) -> Evaluator:
        if config.seed not in evaluators:
            member_setup = dataclasses.replace(setup, config=ml_collections.FrozenConfigDict(config))
            evaluators[config.seed] = Evaluator(member_setup, ref_params, eval_key(config.seed))
        return evaluators[config.seed]

    for m in members:  # as train.run does
        write_reference_front(m.workdir, evaluator(m.config).reference_points())

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
                master = sharding.process_local(jax.device_put(member(state.params, i), params_sharding))
                params = model_params(setup, compute_params(setup, master), ref_params)  # as the step samples it
                metrics = evaluator(m.config)(params)
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
            m.checkpointer.save(step, member(state, i), meta)
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
            state, metrics = train_step(state, context.batch(step), context.fixed, traced)
            step += 1
            if is_logging_step(step, c):
                host = {f"train/{k}": np.asarray(v) for k, v in jax.device_get(metrics).items()}
                drop_nonfinite()
                for i, m in alive():
                    m.writer.write(step, {k: float(v[i]) for k, v in host.items()})
            if is_eval_step(step, c):
                evaluate(step)
            if is_logging_step(step, c) or is_eval_step(step, c):
                progress.update(step)
            if is_checkpoint_step(step, c):
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
    return finish_run(m.workdir, m.config)
