"""Test-time BOND: distil Best-of-N into one copy of the policy per prompt, at inference.

Given policy parameters (the reference by default, or a run's checkpoint), a set of prompts and
the run's reward judge, each prompt gets its own copy of the policy, adapted by K steps of a
registered algorithm (BOND, J-BOND, WIND, ...) on that prompt alone. All prompts are one
program: the train step (`bond.step.make_train_step`) vmapped over the members of a population
(`bond.population.make_population_step` with `per_member_batch`), where member i has its own
state, its own `Traced` (seed key, and the reference samples of its prompt) and its own `Batch`:
its one prompt repeated `rows` times. Member i computes what a population of that prompt alone
computes (tests/test_test_time.py).

Cost is counted in reward queries, exactly (`query_count`): per prompt and step, every sample the
step scores with the reward judge — `rows` × (the sampling plan's policy + anchor samples, plus its
reference samples when they are drawn at every step); plus, once per prompt, the reference samples
drawn before the first step when the plan caches them (config.cache_reference_samples). Exact
evaluation (below) reads the task's reward of every response and is not part of the budget. With a
pair judge (a preference model, pretrained tasks only) WIND also queries it on the S² pairs of each
row's samples: counted apart as `pair_queries`.

Then each adapted copy is evaluated exactly (bond/exact.py, every response of the toy language
enumerated) on its own prompt against π_ref and π_BoN(N) of π_ref: reward, KL(π‖π_ref), win rate
against π_ref, KL(π‖π_BoN(N)) and KL(π_BoN(N)‖π).

    python -m bond.test_time --config=configs/bond.py:quick --num_prompts=4 --steps=50 --n=16
    python -m bond.test_time --config=configs/j_bond.py --checkpoint=runs/j_bond --out=/tmp/tt.json

Determinism: member i's seed key is fold_in(PRNGKey(config.seed), id_i) and its reference samples
are drawn with fold_in(reference_cache_key(config.seed), id_i), where id_i is the prompt's index in
the prompt set (`member_ids`): a prompt adapted alone with its id gets the same copy.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from bond import exact, population, sharding
from bond.algorithms import get_algorithm
from bond.checkpoint import Checkpointer, abstract_like
from bond.context import Setup, anchor_kind, eval_key, judge_shardings, make_setup, reference_cache_key
from bond.evaluation import Evaluator
from bond.step import (
    Batch, Fixed, Traced, TrainState, compute_params, draw_samples, init_state, make_optimizer, state_shardings,
    traced_inputs,
)
from bond.tasks import Prompts
from bond.validation import ConfigError


# ---------------------------------------------------------------------------------------------
# Reward queries


@dataclasses.dataclass(frozen=True)
class QueryCount:
    """Reward queries per prompt: `once` before the first step (cached reference samples), then
    `per_step` at every step; `pair_queries_per_step` are a pair judge's, counted apart."""

    once: int
    per_step: int
    pair_queries_per_step: int = 0

    def total(self, steps: int) -> int:
        """Reward queries per prompt after `steps` steps."""
        return self.once + steps * self.per_step

    def steps_within(self, budget: int) -> Optional[int]:
        """The most steps whose total stays within `budget` queries per prompt; None when even the
        queries before the first step exceed it."""
        if budget < self.once:
            return None
        return (budget - self.once) // self.per_step if self.per_step else None


def caches_reference(setup: Setup) -> bool:
    """Whether the reference samples are drawn once per prompt (before the first step) rather than at every step."""
    plan = setup.plan
    return bool(plan.reference and plan.cache_reference and setup.config.cache_reference_samples)


def query_count(setup: Setup, rows: int) -> QueryCount:
    """The reward queries of adapting one prompt with `rows` copies of it per step (see the module
    docstring): every sample the step scores, from the algorithm's sampling plan."""
    plan = setup.plan
    cached = caches_reference(setup)
    per_row = plan.policy + plan.anchor + (0 if cached else plan.reference)
    pairs = rows * plan.policy**2 if setup.preference_judge is not None and setup.algorithm.name == "wind" else 0
    return QueryCount(once=plan.reference if cached else 0, per_step=rows * per_row, pair_queries_per_step=pairs)


# ---------------------------------------------------------------------------------------------
# The population of per-prompt copies


@dataclasses.dataclass
class Adaptation:
    """Per-prompt copies of a policy, adapted together; `state` has a leading member axis (padded
    to the mesh's 'data' axis with copies of the last member), `num_prompts` real members."""

    setup: Setup
    state: TrainState
    batch: Batch
    fixed: Fixed
    traced: Traced
    num_prompts: int
    program: Callable

    @property
    def steps(self) -> int:
        return int(jax.device_get(self.state.step)[0])

    def advance(self, steps: int) -> Adaptation:
        """`steps` more steps of every copy (the state is updated in place of the old one)."""
        for _ in range(steps):
            self.state, _ = self.program(self.state, self.batch, self.fixed, self.traced)
        return self

    def params(self) -> Any:
        """The adapted copies' float32 master weights, [num_prompts, ...] leaves in host memory."""
        return jax.tree.map(lambda x: np.asarray(x)[: self.num_prompts], jax.device_get(self.state.params))


_PROGRAMS: dict[tuple, Callable] = {}


def adaptation_program(setup: Setup, fixed_shardings: Fixed) -> Callable:
    """The jitted per-prompt population step (members split over the mesh's 'data' axis, the
    state donated), one per program key (`bond.population.program_key` and the judges the step
    calls) for the life of the process."""
    key = population.program_key(setup) + (id(setup.reward_fn), id(setup.preference_judge))
    if key not in _PROGRAMS:
        members = population.population_sharding(setup.mesh)
        _PROGRAMS[key] = sharding.jit_sharded(
            population.make_population_step(setup, per_member_batch=True),
            in_shardings=(members, members, fixed_shardings, members),
            out_shardings=(members, members),
            donate_argnums=(0,),
        )
    return _PROGRAMS[key]


def _reference_draw(setup: Setup, count: int) -> Callable:
    """(ref params, judges, prompt [P], mask [P], key) → `count` scored samples of π_ref for one
    prompt ([1, count, ...] leaves), vmapped over prompts and jitted."""
    reads = setup.algorithm.reads_of("reference")

    def one(ref_params, judges, prompt, mask, key):
        return draw_samples(setup, ref_params, prompt[None], mask[None], key, count, judges, "reference",
                            {"reference": ref_params}, reads)

    return jax.jit(jax.vmap(one, in_axes=(None, None, 0, 0, 0)))


def prepare(setup: Setup, ref_params, policy_params, prompts: Prompts, *, rows: int,
            member_ids: Optional[Sequence[int]] = None) -> Adaptation:
    """Per-prompt copies of `policy_params`, ready to adapt on `prompts` ([num, P] tokens and mask).

    Args:
      setup: the run's static facts (`bond.context.make_setup`); config.seed seeds every copy.
      ref_params: π_ref, the reference the algorithm's loss and the reference samples read.
      policy_params: where every copy (and its anchor) starts: π_ref, or a trained policy.
      prompts: one prompt per copy.
      rows: the batch of each step: the copy's prompt repeated `rows` times.
      member_ids: the prompts' indices in the prompt set (default 0..num−1); they seed the copies.
    """
    tokens, mask = np.asarray(prompts.tokens, np.int32), np.asarray(prompts.mask, np.int32)
    num = tokens.shape[0]
    if rows < 1:
        raise ValueError(f"rows={rows} must be >= 1: the copies of each prompt a step trains on.")
    ids = np.arange(num) if member_ids is None else np.asarray(member_ids, np.int64)
    if ids.shape != (num,):
        raise ValueError(f"member_ids has {ids.shape[0] if ids.ndim else 0} entries for {num} prompts; give one per prompt.")
    c = setup.config
    seed_key = jax.random.PRNGKey(c.seed)
    keys = jnp.stack([jax.random.fold_in(seed_key, int(i)) for i in ids])
    reference = None
    if caches_reference(setup):
        ref_keys = jnp.stack([jax.random.fold_in(reference_cache_key(c.seed), int(i)) for i in ids])
        judges = sharding.process_local(setup.judge_params)
        reference = _reference_draw(setup, setup.plan.reference)(
            sharding.process_local(ref_params), judges, jnp.asarray(tokens), jnp.asarray(mask), ref_keys)
    hp = traced_inputs(c).hparams
    traced = Traced({k: np.repeat(np.asarray(v)[None], num, 0) for k, v in hp.items()}, keys, reference)
    # No step of an adaptation logs its train metrics: the passes only they read are skipped.
    batch = Batch(np.repeat(tokens[:, None], rows, 1), np.repeat(mask[:, None], rows, 1), np.zeros((num, rows), np.int32),
                  np.zeros(num, bool))

    size = population.padded_size(num, setup.mesh)
    pad = lambda tree: jax.tree.map(lambda x: np.concatenate([np.asarray(x), np.repeat(np.asarray(x)[-1:], size - num, 0)]), tree)
    members = population.population_sharding(setup.mesh)
    state0 = init_state(setup, policy_params)
    params_sh = state_shardings(setup, state0).params
    fixed_sh = Fixed(params_sh, judge_shardings(setup))
    state = sharding.place(population.broadcast_tree(sharding.process_local(state0), size), members)
    return Adaptation(
        setup=setup, state=state, batch=sharding.place(pad(batch), members),
        fixed=Fixed(sharding.place(ref_params, params_sh), setup.judge_params),
        traced=sharding.place(pad(traced), members), num_prompts=num, program=adaptation_program(setup, fixed_sh),
    )


# ---------------------------------------------------------------------------------------------
# Exact evaluation of the copies


class ExactTables:
    """π_ref's and the reward's exact tables over every response of each prompt (bond/exact.py),
    and the exact evaluation of per-prompt copies against them."""

    def __init__(self, setup: Setup, ref_params, prompts: Prompts):
        self.evaluator = Evaluator(setup, sharding.process_local(ref_params), eval_key(setup.config.seed), prompts=prompts)
        if not self.evaluator.exact:
            raise ConfigError(f"config.task={setup.config.task!r} is not enumerable (or config.eval.exact is off); "
                              "test-time evaluation needs the exact tables: use the toy language.")
        self.setup = setup
        model, space = setup.model, self.evaluator.space
        self._logprobs = jax.jit(jax.vmap(
            lambda p, x, m: exact.response_logprobs(model, p, x[None], m[None], space)[0]))

    @property
    def ref_logprobs(self) -> jax.Array:
        return self.evaluator.ref_logprobs

    @property
    def rewards(self) -> jax.Array:
        return self.evaluator.rewards

    def logprobs(self, stacked_params) -> jax.Array:
        """Exact log π_i(y | x_i) [num, M] of copy i on its own prompt x_i (`stacked_params` master
        weights or the model's own dtype: evaluated as the model computes, `compute_params`)."""
        ev = self.evaluator
        return self._logprobs(compute_params(self.setup, stacked_params), ev.prompts, ev.prompt_mask)

    def metrics(self, stacked_params, ns: Sequence[int]) -> dict[str, dict[str, np.ndarray]]:
        """`exact.exact_metrics` of the copies (copy i on prompt i) for best-of-N with N in `ns`:
        {"per_prompt": {name: [num]}, "mean": {name: float}}."""
        out = exact.exact_metrics(self.logprobs(stacked_params), self.ref_logprobs, self.rewards, tuple(ns))
        return {"per_prompt": {k: np.asarray(v) for k, v in out["per_prompt"].items()},
                "mean": {k: float(v) for k, v in out["mean"].items()}}


def stacked(params, num: int) -> Any:
    """`num` copies of one parameter tree along a new leading axis (π_ref as a population)."""
    return population.broadcast_tree(sharding.process_local(params), num)


# ---------------------------------------------------------------------------------------------
# Where the copies start


def policy_from_run(setup: Setup, ref_params, workdir: str | Path, log: Callable[[str], None] = print) -> Any:
    """The policy parameters of the newest readable checkpoint in `workdir`/checkpoints (a `bond.main`
    run of the same model), restored with that run's own state layout (anchor, optimizer) read from
    its config.json."""
    workdir = Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"--checkpoint={workdir}: no config.json there; pass the workdir of a bond.main run.")
    run_config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    if run_config.model.to_dict() != setup.config.model.to_dict() and setup.config.task != "pretrained":
        raise ConfigError(f"--checkpoint={workdir}: its config.model {run_config.model.to_dict()} differs from "
                          f"this config's {setup.config.model.to_dict()}; pass a config with the run's model.")
    run_anchor = anchor_kind(run_config, get_algorithm(run_config.algorithm))
    state = init_state(dataclasses.replace(setup, anchor_kind=run_anchor), ref_params)
    state = state._replace(opt_state=make_optimizer(run_config).init(state.params))
    shardings = state_shardings(dataclasses.replace(setup, anchor_kind=run_anchor), state)
    restored = Checkpointer(workdir / "checkpoints", keep=1).restore_latest(abstract_like(state, shardings), log)
    if restored is None:
        raise ConfigError(f"--checkpoint={workdir}: no checkpoint in {workdir / 'checkpoints'}.")
    step, state, _ = restored
    log(f"Policy from {workdir / 'checkpoints'} at step {step}")
    return state.params


# ---------------------------------------------------------------------------------------------
# The command


def test_time_config(config: ml_collections.ConfigDict, *, steps: int, n: Optional[int]) -> ml_collections.ConfigDict:
    """`config` for adaptation: `steps` steps, best-of-N target N = `n` (config.algo.n, also the
    evaluation's N), no plots."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.steps = steps
    if n is not None:
        config.algo.n = float(n)
    config.plots = False
    return config


def run(config: ml_collections.ConfigDict, *, num_prompts: int, steps: int, rows: int, n: Optional[int] = None,
        checkpoint: str = "", log: Callable[[str], None] = print) -> dict:
    """Adapts one copy per eval prompt (the first `num_prompts` of the task's eval set) for `steps`
    steps and evaluates every copy exactly; returns {"queries", "before", "after", "per_prompt", ...}."""
    config = test_time_config(config, steps=steps, n=n)
    if config.lora.rank:
        raise ValueError("config.lora.rank: test-time BOND adapts a full copy of the policy per prompt; adapters "
                         "per prompt are not supported here yet. Set config.lora.rank=0.")
    setup, ref_params = make_setup(config, log)
    n = int(round(config.algo.n))
    prompts = setup.task.prompts("eval", num_prompts, config.seed)
    start = policy_from_run(setup, ref_params, checkpoint, log) if checkpoint else ref_params
    tables = ExactTables(setup, ref_params, prompts)
    before = tables.metrics(stacked(start, num_prompts), (n,))
    adaptation = prepare(setup, ref_params, start, prompts, rows=rows).advance(steps)
    after = tables.metrics(adaptation.params(), (n,))
    count = query_count(setup, rows)
    return {
        "algorithm": config.algorithm, "task": config.task, "n": n, "steps": steps, "rows": rows,
        "num_prompts": num_prompts, "start": checkpoint or "reference",
        "queries": {"per_prompt": count.total(steps), "total": count.total(steps) * num_prompts, "once": count.once,
                    "per_step": count.per_step, "pair_queries_per_prompt": steps * count.pair_queries_per_step,
                    "best_of_n_per_sample": n},
        "before": before["mean"], "after": after["mean"],
        "per_prompt": {k: v.tolist() for k, v in after["per_prompt"].items()},
    }


def format_report(result: dict) -> str:
    """The before → after table (means over prompts) and the query count."""
    n, q = result["n"], result["queries"]
    lines = [f"test-time {result['algorithm']} from {result['start']} on {result['num_prompts']} prompts of "
             f"{result['task']}, {result['steps']} steps of {result['rows']} rows: exact evaluation before → after"]
    for key in ("reward", "kl_policy_ref", "win_rate_vs_ref", f"kl_policy_bon{n}", f"kl_bon{n}_policy", f"bon{n}_reward"):
        lines.append(f"  {key:<22} {result['before'][key]:>10.4f} → {result['after'][key]:>10.4f}")
    lines.append(f"  reward queries per prompt: {q['per_prompt']} ({q['once']} before the first step + "
                 f"{q['per_step']} per step); best-of-{n} sampling spends {n} per sample, so it costs more "
                 f"beyond {q['per_prompt'] / n:g} samples per prompt (at the accuracy above).")
    return "\n".join(lines)


flags.DEFINE_integer("num_prompts", 4, "Eval prompts to adapt one copy for each (the first ones of the task's eval set).")
flags.DEFINE_integer("steps", 50, "Adaptation steps K per prompt.")
flags.DEFINE_integer("rows", 4, "Copies of its prompt in each step's batch (per prompt).")
flags.DEFINE_integer("n", None, "N of the best-of-N target (config.algo.n); default: the config's.")
flags.DEFINE_string("checkpoint", "", "Workdir of a bond.main run whose policy the copies start from; default: π_ref.")
flags.DEFINE_string("out", "", "Write the result as JSON to this file.")


def main(argv) -> None:
    del argv
    from bond import main as bond_main

    bond_main.quiet_library_logging()
    f = flags.FLAGS
    try:
        for name in ("num_prompts", "steps", "rows"):
            if f[name].value < 1:
                raise bond_main.UsageError(f"--{name}={f[name].value} must be >= 1.")
        if f.n is not None and f.n < 2:
            raise bond_main.UsageError(f"--n={f.n} must be >= 2 (the N of best-of-N).")
        bond_main.use_compilation_cache(f.config.cache_dir)
        result = run(f.config, num_prompts=f.num_prompts, steps=f.steps, rows=f.rows, n=f.n, checkpoint=f.checkpoint)
    except (bond_main.UsageError, ConfigError) as e:
        bond_main.exit_on_error(e)
    print(format_report(result))
    if f.out:
        Path(f.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f.out).write_text(json.dumps(result, indent=1))
        print(f"Result in {f.out}")


def _parse_or_exit(argv: list[str]) -> list[str]:
    from bond import main as bond_main

    try:
        return bond_main.parse_command_line(argv)
    except bond_main.UsageError as e:
        bond_main.exit_on_error(e)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_or_exit)
