"""A run, assembled once: config → setup → state → shardings → prompts → reference samples → inputs.

`build_context(config)` is the one place a run is put together; `bond.train.run`, population
mode (bond/population.py), the experiments and the benchmarks all start from it:

    setup        static facts (task, model, algorithm, sampling plan, anchor rule, judges, mesh)
    state        the initial TrainState (policy and anchor at the reference), placed on the mesh
    shardings    where each step input lives (`StepShardings`, by name)
    fixed        the reference and judges' parameters (`Fixed`)
    traced       hyperparameters, seed key and the per-prompt reference samples (`Traced`)
    prompts      the random-access train prompt source; `batch(step)` is step t's `Batch`
    step()       the compiled train step

Determinism: step t's randomness is fold_in(PRNGKey(seed), t) and its prompts are rows
`batch_rows(t, B, N)` of the train prompt stream, so a run resumed from a checkpoint continues
exactly as if never stopped.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bond import algorithms, sharding, stages
from bond import lora as adapters
from bond.algorithms import Algorithm, Samples, SamplingPlan
from bond.checkpoint import abstract_like
from bond.models import PairJudge, RewardFn, TransformerConfig, reward_model_fn
from bond.step import (
    Batch, Fixed, StepShardings, Traced, TrainState, compile_train_step, draw_samples, init_state, reference_shardings,
    state_shardings,
    traced_inputs,
)
from bond.tasks import Task, get_task, synthetic_language
from bond.tasks import pretrained as pretrained_task
from bond.tasks.prompts import batch_rows, load_prompts, read_prompt_rows
from bond.validation import ConfigError, validate


# ---------------------------------------------------------------------------------------------
# Setup: the static facts of a run


@dataclasses.dataclass(frozen=True)
class Setup:
    """Static facts of a run, derived once from the config."""

    config: ml_collections.FrozenConfigDict
    task: Task
    model: TransformerConfig
    algorithm: Algorithm
    plan: SamplingPlan
    anchor_kind: str  # 'none', 'hard' or 'ema'
    # RewardFns on judge_params['reward'] (None without a reward model; `bond.step.reward_params`),
    # passed into the jitted step as an argument so that large judges are not compiled in as constants.
    reward_fn: RewardFn
    eval_reward_fn: RewardFn
    mesh: jax.sharding.Mesh
    judge_params: Any = None  # parameters of the reward / preference models ({'reward': ..., 'preference': ...})
    # A pair scorer's P(y ≻ y') (bond/models/preference.py) on judge_params['preference']: the losses
    # that learn from preferences (WIND) read it through LossInputs.pair_judge.
    preference_judge: Optional[PairJudge] = None
    train_prompts: Any = None  # the train prompt source when the task brings its own (else its TFDS set)


def anchor_kind(config, algorithm: Algorithm) -> str:
    """The anchor rule: none for algorithms without one, else config.anchor.kind."""
    return "none" if algorithm.anchor == "none" else config.anchor.kind


def make_setup(config: ml_collections.ConfigDict, log: Callable[[str], None] = print, *,
               abstract: bool = False, devices: Optional[Sequence[Any]] = None) -> tuple[Setup, Any]:
    """Validates the config, builds (or loads) the reference and reward models; → (Setup, ref params).

    abstract: the models' shapes and dtypes only (jax.ShapeDtypeStruct leaves): nothing is trained
      or read, for compiling the run's programs ahead of time (`assemble` then builds an abstract run).
      A pretrained run then reads only its checkpoints' config.json, or their shape presets.
    devices: the devices the mesh spans (default jax.devices()), e.g. a TPU topology's
      (`bond.dry_run.target_devices`) to compile for hardware this process does not have.
    """
    devices = list(jax.devices() if devices is None else devices)
    validate(config, num_devices=len(devices), shapes_only=abstract)
    algorithm = algorithms.get_algorithm(config.algorithm)
    if any(name not in config.algo for name in algorithm.extra_knobs):  # knobs of an algorithm registered later
        config = ml_collections.ConfigDict(config.to_dict())
        config.algo = algorithm.with_defaults(config.algo)
    mesh = sharding.make_mesh(config.mesh_shape, devices=devices[: config.num_devices or None])
    sharding.check_batch_divides(config.batch_size, mesh, field="config.batch_size")
    if config.task == pretrained_task.TASK_NAME:
        setup, ref_params = _pretrained_setup(config, algorithm, mesh, log, abstract)
    else:
        setup, ref_params = _builtin_setup(config, algorithm, mesh, log, abstract)
    if config.min_new_tokens > setup.task.max_response_length:
        raise ConfigError(
            f"config.min_new_tokens={config.min_new_tokens} exceeds the task's response length "
            f"{setup.task.max_response_length}; lower it (0 = off)."
        )
    model = with_lora(with_memory_options(setup.model, config.memory), config.lora)
    return dataclasses.replace(setup, model=model), ref_params


def with_memory_options(model: TransformerConfig, memory: ml_collections.ConfigDict) -> TransformerConfig:
    """The policy's architecture with the run's `config.memory` choices of how it computes (block
    rematerialization, attention kernel): the same function and parameter tree, other memory and speed.

    Applied once the reference and judges are built, so their cache keys are those of the plain model.
    """
    return dataclasses.replace(model, remat=memory.remat, attention=memory.attention)


def with_lora(model: TransformerConfig, lora: ml_collections.ConfigDict) -> TransformerConfig:
    """The policy's architecture with the run's adapters (config.lora; rank 0: none). Applied, like
    the memory options, after the reference and judges are built: their parameters stay the base's,
    and the base applied alone computes the plain model (bond/lora.py)."""
    if not lora.rank:
        return model
    return dataclasses.replace(model, lora_rank=int(lora.rank), lora_alpha=float(lora.alpha),
                               lora_targets=adapters.targets_of(lora.targets, model.gated_mlp))


def _pretrained_setup(config, algorithm: Algorithm, mesh, log, abstract: bool = False) -> tuple[Setup, Any]:
    """A pretrained checkpoint: policy = reference from its files, judges from theirs, text prompts
    (abstract: shapes from the checkpoints' config.json or presets, `abstract_pretrained_task`)."""
    if abstract:
        loaded = pretrained_task.abstract_pretrained_task(config, mesh)
    else:
        loaded = pretrained_task.load_pretrained_task(config, mesh, log)
    judge = loaded.preference_judge
    setup = Setup(
        config=ml_collections.FrozenConfigDict(config),
        task=loaded.task,
        model=loaded.model,
        algorithm=algorithm,
        plan=algorithm.plan(config.algo),
        anchor_kind=anchor_kind(config, algorithm),
        reward_fn=loaded.reward_fn,
        eval_reward_fn=loaded.reward_fn,
        mesh=mesh,
        judge_params=_on_mesh(loaded.judge_params, mesh),
        preference_judge=judge,
        train_prompts=loaded.train_prompts,
    )
    return setup, loaded.params


def _builtin_setup(config, algorithm: Algorithm, mesh, log, abstract: bool = False) -> tuple[Setup, Any]:
    """A built-in task: the reference pretrained (SFT) on its corpus, its reward or a proxy reward model."""
    task = get_task(config.task)
    model, ref_params = stages.pretrained_reference(config, task, log, abstract=abstract)
    reward_fn, judge_params = task.reward, None
    if config.reward_model.use_proxy:
        rm_model, rm_params = stages.proxy_reward_model(config, task, synthetic_language.preference_corpus, log,
                                                        abstract=abstract)
        judge_params = _on_mesh({"reward": rm_params}, mesh)
        reward_fn = reward_model_fn(rm_model)

    setup = Setup(
        config=ml_collections.FrozenConfigDict(config),
        task=task,
        model=model,
        algorithm=algorithm,
        plan=algorithm.plan(config.algo),
        anchor_kind=anchor_kind(config, algorithm),
        reward_fn=reward_fn,
        eval_reward_fn=task.reward,
        mesh=mesh,
        judge_params=judge_params,
    )
    return setup, ref_params


def judge_shardings(setup: Setup):
    """Where the judges' parameters live: as the checkpoint loader placed them on the mesh, else replicated."""
    return jax.tree.map(lambda x: _mesh_sharding(x, setup.mesh), setup.judge_params)


def _mesh_sharding(x, mesh):
    sh = getattr(x, "sharding", None)
    if isinstance(sh, jax.sharding.NamedSharding) and sh.mesh == mesh:
        return sh
    return sharding.replicated(mesh)


def _on_mesh(tree, mesh):
    """`tree` placed on `mesh`: leaves already there stay, the others (held in full by every process) are
    replicated; abstract leaves (jax.ShapeDtypeStruct) get the sharding they would have."""

    def put(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_mesh_sharding(x, mesh))
        return x if _mesh_sharding(x, mesh) is getattr(x, "sharding", None) else sharding.place(x, sharding.replicated(mesh))

    return jax.tree.map(put, tree)


def train_prompt_source(setup: Setup):
    """The random-access train prompt source: the task's own (pretrained) or its TFDS prompt set."""
    if setup.train_prompts is not None:
        return setup.train_prompts
    c = setup.config
    return load_prompts(c.task, "train", stages.cache_root(c.cache_dir) / "tfds")


def eval_key(seed: int) -> jax.Array:
    """The key of a run's sampled evaluation (the same at every evaluation, so curves compare like with like)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), 2**30)


def reference_cache_key(seed: int) -> jax.Array:
    """The key the reference-sample cache is drawn with."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), 2**30 + 1)


def uses_reference_cache(setup: Setup) -> bool:
    """Whether the run draws its reference samples once per train prompt (see SamplingPlan)."""
    return bool(setup.plan.reference and setup.plan.cache_reference and setup.config.cache_reference_samples)


def build_reference_cache(setup: Setup, ref_params, prompt_source, key: jax.Array, chunk: int = 512,
                          rows_used: Optional[int] = None, pad_to: int = 1) -> Samples:
    """plan.reference samples of π_ref for every train prompt, scored: Samples with [N, k, ...] leaves.

    Drawn once, deterministically from `key` (so a resumed run rebuilds the same cache), in
    chunks of `chunk` prompts through the same compiled sampler the step uses; chunk c's samples
    depend on `key` and c only. A run of T steps of B prompts reads rows below min(N, T·B) only
    (`batch_rows`): with `rows_used`, the chunks wholly above it are zeros, not drawn (a short run
    of a large prompt set does not sample the whole set), and every row below it is the same as in
    the full cache. With several processes pass process-local `ref_params`
    (`sharding.process_local`): every process draws the cache itself, identically. `pad_to`: zero
    rows appended up to a multiple of it (never read: prompt rows are < N), so that the prompt axis
    splits evenly over the mesh's batch shards.
    """
    judge_params = sharding.process_local(setup.judge_params)
    num = len(prompt_source)
    rows_used = num if rows_used is None else min(num, rows_used)
    reads = setup.algorithm.reads_of("reference")
    parts = []
    for start in range(0, num, chunk):
        size = min(chunk, num - start)
        if start >= rows_used:  # never read by this run
            parts.append(jax.tree.map(lambda x: jnp.zeros((size,) + x.shape[1:], x.dtype), parts[0]))
            continue
        batch = read_prompt_rows(prompt_source, range(start, start + size))
        parts.append(draw_samples(
            setup, ref_params, jnp.asarray(batch.tokens), jnp.asarray(batch.mask), jax.random.fold_in(key, start),
            setup.plan.reference, judge_params, "reference", {"reference": ref_params}, reads,
        ))
    padding = -num % pad_to
    if padding:
        parts.append(jax.tree.map(lambda x: jnp.zeros((padding,) + x.shape[1:], x.dtype), parts[0]))
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)


class _FirstRows(Sequence):
    """The first `num` rows of a prompt source."""

    def __init__(self, source: Sequence, num: int):
        self.source, self.num = source, min(num, len(source))

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: int):
        return self.source[index]


def _first_on_process_zero(make: Callable[[], Any], name: str) -> Any:
    """make() on process 0, then (after a barrier) on the others: for steps that fill a shared cache."""
    first = jax.process_index() == 0
    result = make() if first else None
    sharding.sync_processes(name)
    return result if first else make()




# ---------------------------------------------------------------------------------------------
# The run context


def is_logging_step(step: int, config) -> bool:
    """Whether a run writes train metrics after `step` steps (every log_every-th and the last)."""
    return step % config.log_every == 0 or step == config.steps


@dataclasses.dataclass
class RunContext:
    """Everything one run needs, assembled once from its config (see the module docstring).

    Arrays are placed on the mesh. With several processes, `local_reference` is the reference
    held in full by this process (for the evaluator and the reference samples) and `batch(step)`
    feeds this process's rows.
    """

    setup: Setup
    state: TrainState
    shardings: StepShardings
    fixed: Fixed
    traced: Traced
    prompt_source: Sequence
    local_reference: Any
    abstract: bool = False  # arrays are jax.ShapeDtypeStructs (for compiling ahead of time)

    @property
    def config(self) -> ml_collections.FrozenConfigDict:
        return self.setup.config

    def batch(self, step: int, logging: Optional[bool] = None) -> Batch:
        """The input of the step that takes the state from `step` to `step + 1` steps: its prompts
        (this process's rows of them), placed as `shardings.batch` says, and whether its metrics are
        written (default: `is_logging_step(step + 1, config)`, as `bond.train.run` logs)."""
        c = self.config
        rows = batch_rows(step, c.batch_size, len(self.prompt_source))
        prompts = read_prompt_rows(self.prompt_source, rows)
        logging = is_logging_step(step + 1, c) if logging is None else logging
        if self.abstract:
            return abstract_like(Batch(prompts.tokens, prompts.mask, rows.astype(np.int32), np.bool_(logging)),
                                 self.shardings.batch)
        target = self.shardings.batch.prompts
        local = sharding.local_batch_rows(target, c.batch_size)
        tokens, mask, rows = sharding.host_local_to_global(
            (prompts.tokens[local], prompts.mask[local], rows[local].astype(np.int32)), target)
        return Batch(tokens, mask, rows, sharding.place(np.bool_(logging), self.shardings.batch.logging))

    @functools.cached_property
    def step(self) -> Callable[[TrainState, Batch, Fixed, Traced], tuple[TrainState, dict]]:
        """The compiled train step (`bond.step.compile_train_step` with this run's shardings)."""
        return compile_train_step(self.setup, self.shardings)

    def reference_samples(self, seed: int) -> Optional[Samples]:
        """The reference samples a run with `seed` draws once per train prompt (None when it draws
        them at every step), from this process's reference; memoized per seed."""
        if not uses_reference_cache(self.setup):
            return None
        if seed not in self._reference_samples:
            build = functools.partial(build_reference_cache, self.setup, prompt_source=self.prompt_source,
                                      key=reference_cache_key(seed),
                                      rows_used=self.config.steps * self.config.batch_size,
                                      pad_to=sharding.num_batch_shards(self.setup.mesh))
            self._reference_samples[seed] = (
                self._abstract_reference_samples() if self.abstract else build(self.local_reference))
        return self._reference_samples[seed]

    def _abstract_reference_samples(self) -> Samples:
        """The shapes of `build_reference_cache`'s output: one chunk's, with a leading axis of every train prompt."""
        one_chunk = functools.partial(build_reference_cache, self.setup, prompt_source=_FirstRows(self.prompt_source, 1),
                                      key=reference_cache_key(0))
        shapes = jax.eval_shape(one_chunk, self.local_reference)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct((len(self.prompt_source),) + x.shape[1:], x.dtype), shapes)

    def traced_for(self, config: ml_collections.ConfigDict) -> Traced:
        """`Traced` of `config`, a config that differs from this run's at most in traced fields (a
        population member): its hyperparameters, seed key and reference samples, in host memory."""
        return traced_inputs(config, self.reference_samples(config.seed))

    _reference_samples: dict = dataclasses.field(default_factory=dict, repr=False)


def build_context(config: ml_collections.ConfigDict, log: Callable[[str], None] = print, *,
                  split_batch: bool = True, abstract: bool = False,
                  devices: Optional[Sequence[Any]] = None) -> RunContext:
    """Assembles the run of `config`: validates it, builds (or loads) the models (`make_setup`),
    then `assemble`s the run around them. With `abstract`, every array of the run is a
    jax.ShapeDtypeStruct carrying its sharding (nothing trained, loaded or drawn): the real run's
    step, compiled ahead of time, `context.step.lower(context.state, context.batch(0),
    context.fixed, context.traced).compile()`, gives its memory and cost analyses."""
    setup, ref_params = make_setup(config, log, abstract=abstract, devices=devices)
    return assemble(setup, ref_params, split_batch=split_batch)


def assemble(setup: Setup, ref_params, *, split_batch: bool = True) -> RunContext:
    """The run of `setup` from the reference `ref_params`: places the initial state and the fixed
    parameters on the mesh, opens the train prompts and draws the reference samples.

    split_batch: split each step's prompts over the mesh's batch axes (a single run); False keeps
      them whole on every device (a population, whose members are split over the 'data' axis instead).
    """
    abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(ref_params))
    state = jax.eval_shape(functools.partial(init_state, setup), ref_params) if abstract else init_state(setup, ref_params)
    state_sh = state_shardings(setup, state)
    ref_sh = reference_shardings(setup, ref_params)
    rep = sharding.replicated(setup.mesh)
    shardings = StepShardings(
        state=state_sh,
        batch=Batch.shardings(setup.mesh, split=split_batch),
        fixed=Fixed(ref_sh, judge_shardings(setup)),
        # The reference samples [N (padded), k, ...] split over the batch axes like the prompts (a
        # population splits their prompt axis itself, `bond.population.population_shardings`).
        traced=Traced(rep, rep, sharding.batch_sharding(setup.mesh) if split_batch else rep),
    )
    place = (lambda tree, where: abstract_like(tree, sharding.broadcast_shardings(where, tree))) if abstract \
        else sharding.place
    state = place(state, state_sh)
    ref_params = place(ref_params, ref_sh)
    prompt_source = _first_on_process_zero(lambda: train_prompt_source(setup), "bond.context:prompts")
    if len(prompt_source) == 0:
        raise ConfigError("the train prompt set is empty; point the config's prompt source at a non-empty split.")
    context = RunContext(
        setup=setup, state=state, shardings=shardings, fixed=Fixed(ref_params, setup.judge_params),
        traced=Traced({}, None), prompt_source=prompt_source,
        local_reference=ref_params if abstract else sharding.process_local(ref_params), abstract=abstract,
    )
    context.traced = place(context.traced_for(setup.config), shardings.traced)
    return context
