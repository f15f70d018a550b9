"""Running a sweep's unfinished points: as supervised `python -m bond.main` processes, or as
population programs (bond/population.py); then its results table and plots.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from bond.sweep.reporting import collect_results, plot_sweep, write_results
from bond.sweep.spec import Point, format_value, is_finished, plan_sweep, point_dir, resolve_config_spec


def point_command(spec: ml_collections.ConfigDict, point: Point, workdir: str | Path) -> list[str]:
    """The `python -m bond.main` command that runs one point in its own process."""
    args = [sys.executable, "-m", "bond.main", f"--config={resolve_config_spec(spec.base)}", f"--workdir={workdir}"]
    args += [f"--config.{text.strip()}" for text in spec.overrides]
    args += [f"--config.{field}={format_value(value)}" for field, value in point.values]
    return args


def choose_mode(mode: str, configs: Sequence[ml_collections.ConfigDict]) -> str:
    """'processes' or 'population'; 'auto' picks population when the configs can share one program."""
    from bond import population

    if mode == "processes":
        return mode
    try:
        population.check_population(configs)
    except ValueError as e:
        if mode == "population":
            raise ValueError(f"mode='population' is not possible for this sweep: {e}") from None
        return "processes"
    return "population"


def _die_with_parent() -> None:
    """In a child process (Linux): receive SIGTERM when the sweep dies, even by SIGKILL, so that the
    run saves a checkpoint and exits instead of running on unattended (and racing the rerun)."""
    _PRCTL(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


# Resolved in the parent: the child only calls it (no imports between fork and exec).
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def run_processes(
    spec: ml_collections.ConfigDict, points: Sequence[Point], workdir: Path, jobs: int, log: Callable[[str], None]
) -> dict[str, str | None]:
    """Runs each point as its own `python -m bond.main` process, at most `jobs` at once.

    Returns {point name: None if it finished, else the tail of its log}. SIGTERM or Ctrl-C stops
    the sweep after passing SIGTERM to the running points (they save a checkpoint and exit).
    """
    if jobs < 1:
        raise ValueError(f"jobs={jobs} must be >= 1.")
    queue = list(points)
    running: dict[subprocess.Popen, tuple[Point, Any]] = {}
    outcome: dict[str, str | None] = {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    preexec = _die_with_parent if _PRCTL is not None else None

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm) if _in_main_thread() else None
    try:
        while queue or running:
            while queue and len(running) < jobs:
                point = queue.pop(0)
                run_dir = point_dir(workdir, point)
                run_dir.mkdir(parents=True, exist_ok=True)
                command = point_command(spec, point, run_dir)
                (run_dir / "command.txt").write_text(" ".join(command) + "\n")
                log_file = open(run_dir / "log.txt", "a")
                proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec)
                running[proc] = (point, log_file)
                log(f"started {point.name}")
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                point, log_file = running.pop(proc)
                log_file.close()
                run_dir = point_dir(workdir, point)
                if proc.returncode == 0 and is_finished(run_dir):
                    outcome[point.name] = None
                    log(f"finished {point.name}")
                else:
                    tail = "".join((run_dir / "log.txt").read_text().splitlines(keepends=True)[-20:])
                    outcome[point.name] = f"exit status {proc.returncode}; the end of log.txt:\n{tail}"
                    log(f"FAILED {point.name} (exit status {proc.returncode}); see {run_dir / 'log.txt'}")
    finally:
        for proc, (_, log_file) in running.items():
            proc.send_signal(signal.SIGTERM)
        for proc, (_, log_file) in running.items():
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
            log_file.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return outcome


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def build_stages(configs: Sequence[ml_collections.ConfigDict], log: Callable[[str], None]) -> None:
    """Pretrains (or finds in the cache) the reference and reward models the configs need, once
    each, before the point processes start: otherwise every process that starts together would
    build the same one."""
    from bond.context import make_setup

    def stage_fields(config: ml_collections.ConfigDict) -> str:
        fields = ("task", "model", "reference", "reward_model", "cache_dir")
        return json.dumps({k: config[k].to_dict() if k in ("model", "reference", "reward_model") else config[k]
                           for k in fields}, sort_keys=True)

    for config in {stage_fields(c): c for c in configs}.values():
        make_setup(config, log)


def population_groups(configs: Sequence[ml_collections.ConfigDict]) -> list[list[int]]:
    """The configs' indices in groups that can each train as one population program: configs that
    differ only in `population.POPULATION_FIELDS` go together (`population.check_population`).

    Greedy, in order: a config joins the first group it fits, else starts a new one; so groups come in
    the order of their first config, and indices in order within a group.
    """
    from bond import population

    groups: list[list[int]] = []
    for i, config in enumerate(configs):
        for group in groups:
            try:
                population.check_population([*(configs[j] for j in group), config])
            except ValueError:
                continue
            group.append(i)
            break
        else:
            groups.append([i])
    return groups


def run_in_population(
    configs: Sequence[ml_collections.ConfigDict], points: Sequence[Point], workdir: Path, size: int,
    log: Callable[[str], None],
) -> dict[str, str | None]:
    """Runs the points as populations (`population_groups`), each of at most `size` members (0: a
    whole group in one); → {name: None or error}."""
    from bond import population

    outcome: dict[str, str | None] = {}
    for group in population_groups(configs):
        members = size or len(group)
        for start in range(0, len(group), members):
            chunk = group[start:start + members]
            log(f"population of {len(chunk)}: {', '.join(points[i].name for i in chunk)}")
            results = population.run_population(
                [configs[i] for i in chunk], [point_dir(workdir, points[i]) for i in chunk], log
            )
            for i, result in zip(chunk, results):
                if "stopped_at" in result:
                    raise KeyboardInterrupt(f"population stopped by SIGTERM at step {result['stopped_at']}")
                outcome[points[i].name] = result.get("error")
    return outcome


def run_sweep(
    spec: ml_collections.ConfigDict,
    workdir: str | Path,
    jobs: int | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Runs every unfinished point of `spec` into workdir/points/<name>, then writes the results
    table and plots; returns the table's rows (`collect_results`)."""
    points, configs = plan_sweep(spec)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "sweep.json").write_text(
        json.dumps({"spec": spec.to_dict(), "points": [p.name for p in points]}, indent=1, default=str)
    )

    pending = [i for i, p in enumerate(points) if not is_finished(point_dir(workdir, p))]
    mode = choose_mode(spec.mode, configs)
    log(f"{len(points)} points, {len(points) - len(pending)} finished; running {len(pending)} ({mode}) into {workdir}")
    if pending:
        todo = [points[i] for i in pending]
        if mode == "population":
            outcome = run_in_population([configs[i] for i in pending], todo, workdir, spec.population_size, log)
        else:
            build_stages([configs[i] for i in pending], log)
            outcome = run_processes(spec, todo, workdir, jobs or os.cpu_count() or 1, log)
        for point in todo:
            error_file = point_dir(workdir, point) / "error.txt"
            if outcome.get(point.name):
                error_file.parent.mkdir(parents=True, exist_ok=True)
                error_file.write_text(outcome[point.name] + "\n")
            elif error_file.exists():
                error_file.unlink()

    rows = collect_results(spec, points, workdir)
    write_results(spec, points, rows, workdir)
    plot_sweep(spec, points, rows, workdir)
    return rows
