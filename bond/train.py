"""The online loop: a run assembled once (bond/context.py), then step → log → evaluate → checkpoint.

`run(config, workdir)` builds the run's context, resumes from the newest checkpoint in the
workdir, and calls the compiled step (bond/step.py: sample → score → log-probs → loss → optax
update → anchor update → metrics) once per step, logging metrics, evaluating (exact on
enumerable tasks, bond/evaluation.py) and saving checkpoints as the config says.

Determinism: step t's randomness is fold_in(PRNGKey(seed), t) and its prompts are rows
[t·B, (t+1)·B) of the task's train prompt stream, so a run resumed from a checkpoint continues
exactly as if never stopped. Hyperparameters that sweeps vary (β, γ, η, N, learning-rate scale)
enter the step as traced arrays (`bond.step.Traced`): changing them does not recompile.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import jax
import ml_collections

from bond import lora, sharding
from bond.checkpoint import Checkpointer, abstract_like, install_sigterm_handler
from bond.context import build_context, eval_key, is_logging_step
from bond.evaluation import Evaluator
from bond.metrics import MetricWriter, Progress, check_finite, read_metrics
from bond.plots import plot_run, write_reference_front
from bond.step import TrainState, compute_params, model_params


def is_eval_step(step: int, config) -> bool:
    """Whether `run` evaluates after `step` steps (every eval.every-th and the last)."""
    return step % config.eval.every == 0 or step == config.steps


def is_checkpoint_step(step: int, config) -> bool:
    """Whether `run` saves a checkpoint after `step` steps (every checkpoint.every-th and the last)."""
    return step % config.checkpoint.every == 0 or step == config.steps


def run(config: ml_collections.ConfigDict, workdir: str | Path, log: Callable[[str], None] = print) -> dict:
    """Trains `config` into `workdir`, resuming from its last checkpoint; returns the summary dict.

    Under jax.distributed every process calls it with the same config and a `workdir` on a file
    system all processes share: the mesh spans all devices, each process feeds its rows of each
    batch, orbax writes the checkpoints collectively, and only process 0 writes the other files.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    context = build_context(config, log)
    c = context.config
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=1, default=str))

    state = context.state
    checkpointer = Checkpointer(workdir / "checkpoints", keep=c.checkpoint.keep)
    writer = MetricWriter.for_run(workdir, c)
    # A LoRA run's checkpoints hold adapters: each records which base (reference weights) they adapt.
    meta = lora.checkpoint_meta(context.setup.model, context.fixed.reference)
    start, state, saved_meta = (checkpointer.restore_latest(abstract_like(state, context.shardings.state), log)
                                or (0, state, None))
    if start:
        lora.check_same_base(saved_meta, meta, str(workdir / "checkpoints"))
        log(f"Resumed from the checkpoint at step {start} in {workdir / 'checkpoints'}")
    # Lines a killed run wrote after its last checkpoint (all of them when it saved none: step 0 is evaluated again).
    writer.truncate_after(start if start else -1)

    evaluator = Evaluator(context.setup, context.local_reference, eval_key(c.seed))
    if jax.process_index() == 0:
        write_reference_front(workdir, evaluator.reference_points())
    stop = install_sigterm_handler()
    progress = Progress(c.steps)

    def evaluate(step: int) -> dict:
        # The policy as the step samples it: the compute copy of the master weights (with the base, in a LoRA run).
        policy = model_params(context.setup, compute_params(context.setup, sharding.process_local(state.params)),
                              context.local_reference)
        metrics = {f"eval/{k}": v for k, v in evaluator(policy).items()}
        writer.write(step, metrics)
        return metrics

    if start == 0:
        evaluate(0)
    last_saved = start if start else None
    step = start
    try:
        while step < c.steps:
            if stop.stop_requested():
                checkpointer.save(step, state, meta)
                checkpointer.wait_until_finished()
                log(f"Stopped by SIGTERM after step {step}; saved a checkpoint.")
                return {"stopped_at": step}
            state, metrics = context.step(state, context.batch(step), context.fixed, context.traced)
            step += 1
            report = {}  # one progress line per step that logs or evaluates
            if is_logging_step(step, c):
                host = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
                _stop_if_nonfinite(state, last_saved)
                writer.write(step, host)
                report.update(host)
            if is_eval_step(step, c):
                report.update(evaluate(step))
            if report:
                progress.update(step, report)
            if is_checkpoint_step(step, c):
                _stop_if_nonfinite(state, last_saved)
                checkpointer.save(step, state, meta)
                last_saved = step
    finally:
        writer.close()
        stop.close()
        checkpointer.close()  # waits for the last save; raises CheckpointSaveError if a save failed

    sharding.sync_processes("bond.train:finished")  # metrics.jsonl is complete for every process
    return finish_run(workdir, c)


def finish_run(workdir: Path, config) -> dict:
    """Writes summary.json (the first and last evaluation, read from metrics.jsonl) and the plots; returns the summary.

    Every process returns the summary; only process 0 writes files."""
    evals = [r for r in read_metrics(Path(workdir) / "metrics.jsonl") if any(k.startswith("eval/") for k in r)]
    pick = lambda row: {k: v for k, v in row.items() if k.startswith("eval/")}
    summary = {
        "steps": config.steps, "algorithm": config.algorithm, "task": config.task,
        "before": pick(evals[0]) if evals else {}, "after": pick(evals[-1]) if evals else {},
    }
    if jax.process_index() == 0:
        (Path(workdir) / "summary.json").write_text(json.dumps(summary, indent=1))
        if config.plots:
            plot_run(workdir)
    return summary


def _stop_if_nonfinite(state: TrainState, last_saved: Optional[int]) -> None:
    """Raises NonFiniteLossError naming the first step whose loss was NaN/inf and the last good checkpoint."""
    bad = int(state.nonfinite_step)
    if bad >= 0:
        check_finite(bad + 1, {"loss": float("nan")}, last_saved)


