"""Metrics of a training run: a JSON-lines file, TensorBoard event files, a console progress line.

Files in the run's workdir:

  metrics.jsonl          one line per `MetricWriter.write`: {"step": t, "<name>": <float>, ...}
  events.out.tfevents.*  the same scalars for TensorBoard (`tensorboard --logdir <workdir>`)
  wandb/, wandb_run_id   with Weights & Biases on (config.wandb.project set, `MetricWriter.for_run`):
                         wandb's own files, and the id that a resumed run continues

Resuming after a crash. The lines written after the last checkpoint belong to steps the resumed
run repeats; `MetricWriter.truncate_after(restored_step)` removes them (and hides the repeated
TensorBoard events through tensorboardX's `purge_step`), so the file ends up exactly as an
uninterrupted run's. For that, write a step's metrics before saving that step's checkpoint: a
checkpoint at step t then implies that every line up to step t is complete on disk.

Only process 0 of a multi-process run writes files or prints; the other processes' writers and
progress lines do nothing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import jax
import numpy as np
from jax.typing import ArrayLike

METRICS_FILENAME = "metrics.jsonl"
WANDB_ID_FILENAME = "wandb_run_id"
# config.wandb.mode: "" is wandb's default (online, or $WANDB_MODE).
WANDB_MODES = ("", "online", "offline", "disabled")
WANDB_INSTALL = 'pip install -e ".[wandb]"'


def _is_writer_process() -> bool:
    return jax.process_index() == 0


def _host_values(metrics: Mapping[str, ArrayLike]) -> dict[str, np.ndarray]:
    """The metrics as numpy arrays, fetched from the devices in one transfer."""
    names = list(metrics)
    values = jax.device_get([metrics[name] for name in names])  # a list keeps the caller's order
    return {name: np.asarray(value) for name, value in zip(names, values)}


def _check_step(step: Any, fn: str) -> int:
    """`step` as a Python int (it may be a scalar array), after checking it is an integer."""
    try:
        value = int(step)
        is_int = not isinstance(step, bool) and value == step
    except (TypeError, ValueError):
        is_int = False
    if not is_int:
        raise ValueError(f"{fn}: step must be an integer, got {step!r}.")
    return value


def _scalars(metrics: Mapping[str, ArrayLike], fn: str) -> dict[str, float]:
    """Each metric as a Python float; raises ValueError for a non-scalar or a key named 'step'."""
    if "step" in metrics:
        raise ValueError(f"{fn}: 'step' is reserved for the step number; rename that metric.")
    floats = {}
    for name, value in _host_values(metrics).items():
        if value.shape != ():
            raise ValueError(
                f"{fn}: metric {name!r} has shape {value.shape}; only scalars are written. "
                f"Reduce it to a scalar (e.g. its mean) first."
            )
        floats[name] = float(value)
    return floats


# ---------------------------------------------------------------------------------------------
# metrics.jsonl and TensorBoard


class MetricWriter:
    """Appends scalar metrics to `<workdir>/metrics.jsonl`, to TensorBoard event files and,
    optionally, to a Weights & Biases run.

    Every `write` adds one line and flushes it, so a killed process loses at most the line it
    was writing (an unterminated last line, which `read_metrics` and `truncate_after` drop).
    Floats are written with Python's shortest round-trip repr, so reading them back gives the
    exact values written; NaN and infinities are written as NaN, Infinity, -Infinity.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        wandb: Mapping[str, str] | None = None,
        run_config: Mapping[str, Any] | None = None,
    ):
        """Opens (creating if needed) `workdir` and its metrics file, for appending.

        Args:
          workdir: the run's directory.
          tensorboard: also write TensorBoard event files (with tensorboardX). If tensorboardX
            cannot be imported, warns once and writes only the JSON lines.
          wandb: config.wandb ({"project", "entity", "mode"}): with a project, every `write` is
            also logged to a W&B run (`open_wandb_run`); None or project "" = off, and wandb is
            never imported.
          run_config: the run's config as a dict, shown by W&B.

        Raises:
          ValueError: `wandb` turns W&B on but wandb is not installed or the mode is unknown.
        """
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.path = os.path.join(self.workdir, METRICS_FILENAME)
        self._active = _is_writer_process()
        self._file: TextIO | None = None
        self._summary_writer_cls = None
        self._summary_writer = None
        self._purge_step: int | None = None
        self._wandb_run = None
        if not self._active:
            return
        os.makedirs(self.workdir, exist_ok=True)
        if wandb and wandb.get("project"):
            self._wandb_run = open_wandb_run(self.workdir, wandb, run_config)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as e:
                warnings.warn(
                    f"tensorboardX could not be imported ({e}); metrics go to {self.path} only. "
                    f"Install it with `pip install tensorboardX` for TensorBoard event files.",
                    stacklevel=2,
                )
            else:
                self._summary_writer_cls = SummaryWriter

    @classmethod
    def for_run(cls, workdir: str | os.PathLike, config: Mapping[str, Any]) -> MetricWriter:
        """The writer of a run of `config` (train.run, and each member of a population): JSON
        lines, TensorBoard, and W&B when config.wandb.project is set."""
        settings = config.get("wandb")
        on = bool(settings and settings.get("project"))
        return cls(workdir, wandb=settings if on else None, run_config=config.to_dict() if on else None)

    def write(self, step: int, metrics: Mapping[str, ArrayLike]) -> None:
        """Writes the scalar `metrics` of step `step` (Python numbers or 0-d arrays)."""
        step = _check_step(step, "MetricWriter.write")
        floats = _scalars(metrics, "MetricWriter.write")
        if not self._active:
            return
        self._file.write(json.dumps({"step": step, **floats}) + "\n")
        self._file.flush()
        if self._summary_writer_cls is not None:
            if self._summary_writer is None:
                # Created on first use, so that a `truncate_after` before any write only sets
                # the purge step of the one event file this run writes.
                # tensorboardX names files by the second; the nanosecond suffix keeps a file
                # opened within the same second (a quick resume) from overwriting the last one,
                # and keeps the names in the order TensorBoard reads them.
                self._summary_writer = self._summary_writer_cls(
                    logdir=self.workdir, purge_step=self._purge_step, filename_suffix=f".{time.time_ns()}"
                )
            for name, value in floats.items():
                self._summary_writer.add_scalar(name, value, global_step=step)
        if self._wandb_run is not None:
            self._wandb_run.log(floats, step=step)

    def truncate_after(self, step: int) -> None:
        """Drops every line with a step greater than `step` (and an unterminated last line).

        Call it when a run resumes from the checkpoint at `step`; a fresh run calls it with −1 to
        discard every line of an earlier attempt that saved no checkpoint (it evaluates step 0 again).
        The file is replaced atomically. TensorBoard events of steps > `step` from earlier event
        files are hidden by the `purge_step` of the next event file.
        """
        step = _check_step(step, "MetricWriter.truncate_after")
        if not self._active:
            return
        self._file.close()
        kept = [line for line in _complete_lines(self.path) if json.loads(line)["step"] <= step]
        temporary = self.path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(temporary, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        if self._summary_writer is not None:
            self._summary_writer.close()
            self._summary_writer = None
        self._purge_step = step + 1

    def close(self) -> None:
        """Flushes and closes the metrics file and the event file, and finishes the W&B run."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._summary_writer is not None:
            self._summary_writer.close()
            self._summary_writer = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Weights & Biases (optional: pip install -e ".[wandb]")


def _wandb_installed() -> bool:
    if "wandb" in sys.modules:
        return sys.modules["wandb"] is not None
    return importlib.util.find_spec("wandb") is not None


def wandb_problem(settings: Mapping[str, str] | None) -> str | None:
    """Why `settings` (config.wandb) cannot turn W&B logging on, naming the field and the fix; None
    when they can, or when logging is off (no settings, or project ""). bond.validation checks it
    before a run starts, so a run does not fail at its first metrics."""
    if not settings or not settings.get("project"):
        return None
    mode = settings.get("mode", "")
    if mode not in WANDB_MODES:
        return f"config.wandb.mode={mode!r} is not a W&B mode; choose one of {WANDB_MODES} ('' = wandb's default)."
    if not _wandb_installed():
        return (
            f"config.wandb.project={settings['project']!r} turns Weights & Biases logging on, but wandb is not "
            f"installed: install it with `{WANDB_INSTALL}`, or set config.wandb.project='' to turn it off."
        )
    return None


def open_wandb_run(workdir: str, settings: Mapping[str, str], run_config: Mapping[str, Any] | None):
    """A W&B run for the run in `workdir` (imports wandb only now): named after the folder, its
    files under workdir/wandb, and its id kept in workdir/wandb_run_id so that a resumed run logs
    into the same W&B run. W&B drops a step lower than one it already has, so the steps a resumed
    run repeats (after its last checkpoint) keep their first values there, equal in a deterministic
    run. Several can be open at once (a population's members): each is its own wandb Run.
    """
    problem = wandb_problem(settings)
    if problem is not None:
        raise ValueError(problem)
    import wandb

    id_path = os.path.join(workdir, WANDB_ID_FILENAME)
    if os.path.exists(id_path):
        with open(id_path, encoding="utf-8") as f:
            run_id = f.read().strip()
    else:
        run_id = secrets.token_hex(8)
        with open(id_path, "w", encoding="utf-8") as f:
            f.write(run_id + "\n")
    return wandb.init(
        project=settings["project"],
        entity=settings.get("entity") or None,
        mode=settings.get("mode") or None,
        name=os.path.basename(workdir),
        id=run_id,
        resume="allow",
        dir=workdir,
        config=dict(run_config) if run_config is not None else None,
        reinit="create_new",  # wandb >= 0.19.10: runs open side by side, each logged through its object
    )


def _complete_lines(path: str) -> list[str]:
    """The newline-terminated lines of `path`; a last line without newline was cut by a crash."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    for number, line in enumerate(lines, start=1):
        try:
            json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {number} is not a JSON object ({e}): {line[:200]!r}") from e
    return lines


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in file order (an unterminated last line is dropped).

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: a complete line is not valid JSON, naming the line.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"read_metrics: no metrics file at {path}.")
    return [json.loads(line) for line in _complete_lines(path)]


# ---------------------------------------------------------------------------------------------
# Non-finite losses


class NonFiniteLossError(FloatingPointError):
    """A metric became NaN or infinite; the run stops before saving that state."""

    def __init__(self, step: int, bad: Mapping[str, np.ndarray], last_checkpoint_step: int | None):
        self.step = step
        self.names = tuple(bad)
        self.last_checkpoint_step = last_checkpoint_step
        shown = ", ".join(_describe_non_finite(name, value) for name, value in bad.items())
        if last_checkpoint_step is None:
            resume = "No checkpoint was saved yet, so rerunning the command starts from scratch."
        else:
            resume = (
                f"The last good checkpoint is step {last_checkpoint_step}; rerunning the same command "
                f"resumes from it."
            )
        super().__init__(
            f"Non-finite metric at step {step}: {shown}. The run stopped without saving this state. "
            f"{resume} Lowering the learning rate, or checking the reward for NaN, usually helps."
        )


def _describe_non_finite(name: str, value: np.ndarray) -> str:
    if value.shape == ():
        return f"{name}={float(value)}"
    count = int(np.sum(~np.isfinite(value)))
    return f"{name} ({count} of {value.size} entries non-finite)"


def check_finite(step: int, metrics: Mapping[str, ArrayLike], last_checkpoint_step: int | None) -> None:
    """Raises NonFiniteLossError if any metric (a scalar or any entry of an array) is NaN or ±inf.

    Args:
      step: the step the metrics belong to, named in the message.
      metrics: name -> number or array.
      last_checkpoint_step: the newest complete checkpoint's step, or None if none was saved.
    """
    step = _check_step(step, "check_finite")
    values = _host_values(metrics)
    bad = {name: value for name, value in values.items() if not np.all(np.isfinite(value.astype(np.float64)))}
    if bad:
        raise NonFiniteLossError(step, bad, last_checkpoint_step)


# ---------------------------------------------------------------------------------------------
# Console progress


def format_duration(seconds: float) -> str:
    """A duration as '1h02m03s', '4m05s' or '12s' (rounded to whole seconds)."""
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """A console progress line: step/total, steps/s, ETA and a few metrics, at most every few seconds.

        step 1200/5000 (24.0%) | 3.41 steps/s | ETA 18m34s | loss 0.1234 | kl 0.52

    The first `update` prints at once (the rate is unknown until a second one); later updates print
    when `every_seconds` have passed since the last print, and the last step always prints. The
    rate is an exponential moving average of the rates between prints,
    rate <- smoothing * (Δsteps / Δseconds) + (1 - smoothing) * rate, and ETA = (total - step) / rate.
    On a terminal the line is redrawn in place ('\\r'); otherwise (a log file, a pipe) each print
    is a full line.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        every_seconds: float = 10.0,
        show: Sequence[str] = ("loss",),
        smoothing: float = 0.3,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        """Args:
        total_steps: the step the run ends at.
        every_seconds: the least time between two printed lines.
        show: the metrics to print, in this order (missing ones are skipped).
        smoothing: weight of the newest rate in the moving average, in (0, 1].
        stream: where to print; sys.stdout by default.
        clock: seconds as a float; time.monotonic by default.
        """
        if _check_step(total_steps, "Progress") < 1:
            raise ValueError(f"Progress: total_steps must be a positive int, got {total_steps!r}.")
        if not every_seconds >= 0:
            raise ValueError(f"Progress: every_seconds must be >= 0, got {every_seconds!r}.")
        if not 0 < smoothing <= 1:
            raise ValueError(f"Progress: smoothing must be in (0, 1], got {smoothing!r}.")
        self.total_steps = int(total_steps)
        self.every_seconds = float(every_seconds)
        self.show = tuple(show)
        self.smoothing = float(smoothing)
        self._stream = stream if stream is not None else sys.stdout
        self._clock = clock
        self._active = _is_writer_process()
        self._in_place = self._active and self._stream.isatty()
        self._last_time: float | None = None
        self._last_step = 0
        self._rate: float | None = None
        self._width = 0

    @property
    def steps_per_second(self) -> float | None:
        """The smoothed rate, or None before two lines were printed."""
        return self._rate

    def update(self, step: int, metrics: Mapping[str, ArrayLike] | None = None) -> None:
        """Reports that `step` is complete; prints a line if one is due."""
        step = _check_step(step, "Progress.update")
        if not self._active:
            return
        now = self._clock()
        if self._last_time is not None:
            is_last = step >= self.total_steps
            if now - self._last_time < self.every_seconds and not is_last:
                return
            elapsed = now - self._last_time
            if elapsed > 0 and step > self._last_step:
                rate = (step - self._last_step) / elapsed
                self._rate = rate if self._rate is None else self.smoothing * rate + (1 - self.smoothing) * self._rate
        self._last_time, self._last_step = now, step
        self._print(self.format_line(step, metrics or {}))

    def format_line(self, step: int, metrics: Mapping[str, ArrayLike]) -> str:
        """The progress line for `step` with the current rate."""
        parts = [f"step {step}/{self.total_steps} ({100.0 * step / self.total_steps:.1f}%)"]
        if self._rate is None:
            parts += ["-- steps/s", "ETA --"]
        else:
            parts += [f"{self._rate:.3g} steps/s", f"ETA {format_duration(max(self.total_steps - step, 0) / self._rate)}"]
        shown = {name: metrics[name] for name in self.show if name in metrics}
        for name, value in _host_values(shown).items():
            parts.append(f"{name} {float(value):.4g}" if value.shape == () else f"{name} {value}")
        return " | ".join(parts)

    def _print(self, line: str) -> None:
        if self._in_place:
            self._stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
            if self._last_step >= self.total_steps:
                self._stream.write("\n")
        else:
            self._stream.write(line + "\n")
        self._stream.flush()


def quiet_library_logging() -> None:
    """Library logging at WARNING unless --verbosity (-v) was given on the command line.

    absl's app.run raises an unset --verbosity to 0 (INFO) once the flags are parsed, and the
    libraries log through absl's handler on the root logger: orbax alone writes about fifteen INFO
    lines per checkpoint. The run's own output is printed, not logged, so it is unaffected.
    """
    from absl import flags
    from absl import logging as absl_logging

    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
