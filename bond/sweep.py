"""Hyperparameter sweeps: every point of a grid of config overrides, run, resumed, tabulated and plotted.

    python -m bond.sweep --config=configs/sweeps/j_bond_eta.py --workdir=runs/eta
    python -m bond.sweep --config=configs/sweeps/j_bond_eta.py:quick --workdir=/tmp/eta --jobs=2
    python -m bond.sweep --config=configs/sweeps/bond_n.py --workdir=DIR --set=steps=100 --config.mode=processes

A sweep file (configs/sweeps/*.py) defines `get_config(arg)` returning `sweep_config(...)`:

    base      the config every point starts from, as `--config=` names it ("configs/j_bond.py:quick");
              the sweep file's own argument is appended to its variants (":quick" above);
    axes      a list of `product({field: values})` and `zipped({field: values})`; the points are the
              product of the axes (a `product` axis is every combination of its fields' values, a
              `zipped` axis takes its fields' i-th values together);
    seeds     config.seed values, one more product axis (the last); empty: the base's seed only;
    overrides "field=value" strings applied to the base before the axes (as `--config.field=value`);
    metric    the metric of the results table and plots, e.g. "eval/reward" (a summary "after" key);
    mode      'auto' (population when every varied field is traced, else processes), 'processes'
              or 'population';
    population_size  the most members one population program holds (0: all unfinished points).

Every point has a stable name, "field=value,...,seed=s" in axis order, and its own run folder
DIR/points/<name>, laid out as `train.run` leaves it. A point is finished when that folder has
summary.json. Rerunning a sweep (say after a kill) runs only the unfinished points, and a point
that was cut short resumes from its own checkpoints.

Modes.
  processes   each point is `python -m bond.main --config=<base> --workdir=<point dir>
              --config.<field>=<value> ...` (the exact command is saved as <point dir>/command.txt,
              its output as log.txt). At most `--jobs` run at once, default one per core: an XLA
              CPU process spreads large ops over all cores, but the small programs here keep about
              one core busy (sampling is a sequential while-loop), so one process per core is the
              faster use of a small machine; lower --jobs for large models. The reference (and
              reward model) is pretrained once, by the sweep, before the processes start. A point
              whose process fails gets error.txt and the sweep goes on; SIGTERM, Ctrl-C or the
              sweep's death (even by SIGKILL, on Linux) sends the running points SIGTERM, so they
              save a checkpoint and exit.
  population  every point trains at once as one vmapped program (bond/population.py): only for
              points that differ in traced fields (population.POPULATION_FIELDS: β, γ, η,
              learning rate and its scale, seed, ...). Each point's folder gets the same files as
              in processes mode.

Results: DIR/results.csv (one row per point: its values, status, steps and every final evaluation
metric), DIR/results.md (the same rows with the metric and `HEADLINE_METRICS`, then the metric's
mean ± standard deviation over seeds), DIR/sweep.json (the spec and the point names),
DIR/plots/curves.png (the metric against step for every point) and DIR/plots/final_vs_<field>.png
(the final metric against each swept field, seeds as dots and their mean as a line).
"""

from __future__ import annotations

import ast
import csv
import ctypes
import dataclasses
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from bond.config_base import load_config

MODES = ("auto", "processes", "population")
AXIS_KINDS = ("product", "zip")
ROOT = Path(__file__).resolve().parents[1]
# Shown in results.md next to the sweep's metric (results.csv has every final metric).
HEADLINE_METRICS = (
    "eval/reward", "eval/kl_policy_ref", "eval/win_rate_vs_ref", "eval/log_quantile", "eval/proxy_reward",
)


# ---------------------------------------------------------------------------------------------
# The sweep spec


def product(fields: Mapping[str, Sequence[Any]]) -> dict:
    """An axis of every combination of the fields' values (the first field varies slowest)."""
    return {"product": {field: tuple(values) for field, values in fields.items()}}


def zipped(fields: Mapping[str, Sequence[Any]]) -> dict:
    """An axis whose i-th point takes every field's i-th value (the value lists have equal lengths)."""
    return {"zip": {field: tuple(values) for field, values in fields.items()}}


def sweep_config(
    base: str,
    axes: Sequence[dict] = (),
    seeds: Sequence[int] = (0,),
    metric: str = "eval/reward",
    mode: str = "auto",
    overrides: Sequence[str] = (),
    population_size: int = 0,
) -> ml_collections.ConfigDict:
    """A sweep spec (see the module docstring for the fields)."""
    spec = ml_collections.ConfigDict()
    spec.base = base
    spec.axes = tuple(axes)
    spec.seeds = tuple(seeds)
    spec.metric = metric
    spec.mode = mode
    spec.overrides = tuple(overrides)
    spec.population_size = population_size
    return spec


def with_base_args(base: str, arg: str | None) -> str:
    """`base` with the sweep file's argument appended to its variants: ("c.py:kl", "quick") → "c.py:kl,quick"."""
    if not arg:
        return base
    path, _, variants = base.partition(":")
    return f"{path}:{','.join(v for v in (variants, arg) if v)}"


def load_sweep(spec: str) -> ml_collections.ConfigDict:
    """The sweep spec of a file spec `configs/sweeps/name.py[:arg]`."""
    return load_config(resolve_config_spec(spec))


def resolve_config_spec(spec: str) -> str:
    """`path[:arg]` with the path made absolute: relative to the working directory if the file is
    there, else to the repository root."""
    path, sep, arg = spec.partition(":")
    for candidate in (Path(path), ROOT / path):
        if candidate.is_file():
            return f"{candidate.resolve()}{sep}{arg}"
    raise FileNotFoundError(f"no config file {path!r} (looked in {Path.cwd()} and {ROOT}); fix the sweep's `base`.")


@dataclasses.dataclass(frozen=True)
class Point:
    """One point of a sweep: the value of every swept field, in axis order (seed last)."""

    values: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        """'field=value,...': the point's folder name, stable across runs of the same spec."""
        return ",".join(f"{field}={format_value(value)}" for field, value in self.values)

    def value(self, field: str) -> Any:
        return dict(self.values)[field]


def format_value(value: Any) -> str:
    """A value as it appears in point names and `--config.<field>=` flags (floats: shortest repr)."""
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return value if isinstance(value, str) else repr(value)


def parse_override(text: str) -> tuple[str, Any]:
    """'field=value' → (field, value): the value as a Python literal if it is one, else the string."""
    field, sep, raw = text.partition("=")
    if not sep or not field:
        raise ValueError(f"override {text!r} must look like 'field=value', e.g. 'steps=100' or 'anchor.eta=0.1'.")
    try:
        return field.strip(), ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return field.strip(), raw


def _axis_points(axis: Any, index: int) -> list[tuple[tuple[str, Any], ...]]:
    if not isinstance(axis, Mapping) or len(axis) != 1 or next(iter(axis)) not in AXIS_KINDS:
        raise ValueError(
            f"axes[{index}]={axis!r} must be product({{field: values}}) or zipped({{field: values}}) "
            f"(a dict with one key in {AXIS_KINDS})."
        )
    kind, fields = next(iter(axis.items()))
    if not fields:
        raise ValueError(f"axes[{index}] has no fields; give at least one field: values.")
    for field, values in fields.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise ValueError(f"axes[{index}]: {field!r} needs a non-empty list of values, got {values!r}.")
    if kind == "zip":
        lengths = {field: len(values) for field, values in fields.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(
                f"axes[{index}] zips fields of different lengths {lengths}; give every field as many values."
            )
        length = len(next(iter(fields.values())))
        return [tuple((field, values[i]) for field, values in fields.items()) for i in range(length)]
    combos = itertools.product(*fields.values())
    return [tuple(zip(fields, combo)) for combo in combos]


def expand_points(spec: ml_collections.ConfigDict) -> list[Point]:
    """Every point of the sweep: the product of its axes, then of its seeds."""
    axes = [_axis_points(axis, i) for i, axis in enumerate(spec.axes)]
    fields = [field for axis in axes for field, _ in axis[0]]
    if spec.seeds:
        axes.append([(("seed", int(s)),) for s in spec.seeds])
        fields.append("seed")
    repeated = sorted({f for f in fields if fields.count(f) > 1})
    if repeated:
        raise ValueError(
            f"fields {repeated} are swept by more than one axis (or by an axis and `seeds`); sweep each field once."
        )
    points = [Point(tuple(itertools.chain(*parts))) for parts in itertools.product(*axes)]
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ValueError("the sweep has repeated points (a value listed twice); list each value once.")
    for name in names:
        if os.sep in name:
            raise ValueError(f"point name {name!r} contains {os.sep!r}; swept values must not contain it.")
    return points


def _set_field(config: ml_collections.ConfigDict, field: str, value: Any, what: str) -> None:
    node = config
    *parents, leaf = field.split(".")
    try:
        for part in parents:
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise KeyError(field)
        node[leaf] = value
    except KeyError:
        raise ValueError(f"{what}: config.{field} is not a field of the base config; check its spelling.") from None
    except TypeError as e:
        raise ValueError(f"{what}: config.{field}={value!r} has the wrong type ({e}).") from None


def base_config(spec: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The base config with the sweep's overrides applied."""
    config = load_config(resolve_config_spec(spec.base))
    for text in spec.overrides:
        field, value = parse_override(text)
        _set_field(config, field, value, f"override {text!r}")
    return config


def point_config(
    spec: ml_collections.ConfigDict, point: Point, base: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
    """The config of one point: the base with overrides (`base_config(spec)`, or `base` if given),
    then the point's values."""
    config = ml_collections.ConfigDict((base if base is not None else base_config(spec)).to_dict())  # a copy
    for field, value in point.values:
        _set_field(config, field, value, f"point {point.name}")
    return config


def point_command(spec: ml_collections.ConfigDict, point: Point, workdir: str | Path) -> list[str]:
    """The `python -m bond.main` command that runs one point in its own process."""
    args = [sys.executable, "-m", "bond.main", f"--config={resolve_config_spec(spec.base)}", f"--workdir={workdir}"]
    args += [f"--config.{text.strip()}" for text in spec.overrides]
    args += [f"--config.{field}={format_value(value)}" for field, value in point.values]
    return args


def check_spec(spec: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad field of a sweep spec."""
    for field in ("base", "axes", "seeds", "metric", "mode", "overrides", "population_size"):
        if field not in spec:
            raise ValueError(f"the sweep spec has no {field!r}; build it with bond.sweep.sweep_config(...).")
    if spec.mode not in MODES:
        raise ValueError(f"mode={spec.mode!r} must be one of {MODES}.")
    if not isinstance(spec.population_size, int) or spec.population_size < 0:
        raise ValueError(f"population_size={spec.population_size!r} must be an integer >= 0 (0: one population).")
    if not spec.metric.startswith("eval/"):
        raise ValueError(f"metric={spec.metric!r} must be an evaluation metric, 'eval/<name>' (e.g. 'eval/reward').")
    for seed in spec.seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seeds={tuple(spec.seeds)!r} must be integers >= 0.")


# ---------------------------------------------------------------------------------------------
# Running the points


def point_dir(workdir: str | Path, point: Point) -> Path:
    return Path(workdir) / "points" / point.name


def is_finished(run_dir: str | Path) -> bool:
    """A point is finished when its run folder has summary.json (`train.run` writes it last)."""
    return (Path(run_dir) / "summary.json").is_file()


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
    from bond import train

    def stage_fields(config: ml_collections.ConfigDict) -> str:
        fields = ("task", "model", "reference", "reward_model", "cache_dir")
        return json.dumps({k: config[k].to_dict() if k in ("model", "reference", "reward_model") else config[k]
                           for k in fields}, sort_keys=True)

    for config in {stage_fields(c): c for c in configs}.values():
        train.make_setup(config, log)


def run_in_population(
    configs: Sequence[ml_collections.ConfigDict], points: Sequence[Point], workdir: Path, size: int,
    log: Callable[[str], None],
) -> dict[str, str | None]:
    """Runs the points as populations of at most `size` members (0: all in one); → {name: None or error}."""
    from bond import population

    size = size or len(points)
    outcome: dict[str, str | None] = {}
    for start in range(0, len(points), size):
        chunk = list(range(start, min(start + size, len(points))))
        log(f"population of {len(chunk)}: {', '.join(points[i].name for i in chunk)}")
        results = population.run_population(
            [configs[i] for i in chunk], [point_dir(workdir, points[i]) for i in chunk], log
        )
        for i, result in zip(chunk, results):
            if "stopped_at" in result:
                raise KeyboardInterrupt(f"population stopped by SIGTERM at step {result['stopped_at']}")
            outcome[points[i].name] = result.get("error")
    return outcome


def plan_sweep(spec: ml_collections.ConfigDict) -> tuple[list[Point], list[ml_collections.ConfigDict]]:
    """Every point of `spec` and its validated config.

    Raises:
      ValueError (a bad spec field; `bond.validation.ConfigError` for a point's bad config value,
      naming the point) or FileNotFoundError (a missing config file), before anything runs.
    """
    from bond.validation import ConfigError, validate

    check_spec(spec)
    points = expand_points(spec)
    base = base_config(spec)
    configs = [point_config(spec, p, base) for p in points]
    for point, config in zip(points, configs):
        try:
            validate(config)
        except ConfigError as e:
            raise ConfigError(f"point {point.name}: {e}") from None
    return points, configs


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


# ---------------------------------------------------------------------------------------------
# Results


def point_status(run_dir: Path) -> str:
    """'finished' (summary.json), 'failed' (error.txt) or 'pending'."""
    if is_finished(run_dir):
        return "finished"
    return "failed" if (run_dir / "error.txt").is_file() else "pending"


def collect_results(spec: ml_collections.ConfigDict, points: Sequence[Point], workdir: str | Path) -> list[dict]:
    """One row per point: name, the swept values, status, steps, then every final evaluation metric
    (summary.json's "after"); metrics are absent for unfinished points."""
    rows = []
    for point in points:
        run_dir = point_dir(workdir, point)
        row = {"name": point.name, **dict(point.values), "status": point_status(run_dir)}
        if row["status"] == "finished":
            summary = json.loads((run_dir / "summary.json").read_text())
            row["steps"] = summary["steps"]
            row.update(summary["after"])
        rows.append(row)
    return rows


def _columns(spec: ml_collections.ConfigDict, points: Sequence[Point], rows: Sequence[dict]) -> list[str]:
    fields = [field for field, _ in points[0].values] if points else []
    metrics = sorted({k for row in rows for k in row if k.startswith("eval/")} - {spec.metric})
    return ["name", *fields, "status", "steps", spec.metric, *metrics]


def group_over_seeds(spec: ml_collections.ConfigDict, points: Sequence[Point], rows: Sequence[dict]) -> list[dict]:
    """The metric's mean, sample standard deviation and count over the seeds of each setting of the
    other swept fields (finished points only)."""
    fields = [field for field, _ in points[0].values if field != "seed"] if points else []
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        key = tuple(row[f] for f in fields)
        groups.setdefault(key, [])
        if spec.metric in row:
            groups[key].append(float(row[spec.metric]))
    out = []
    for key, values in groups.items():
        n = len(values)
        mean = sum(values) / n if n else math.nan
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
        out.append({**dict(zip(fields, key)), "mean": mean, "std": std, "n": n})
    return out


def _cell(value: Any, exact: bool) -> str:
    """A markdown cell: swept values exactly as in point names, metrics to 4 decimals."""
    if value is None:
        return ""
    if isinstance(value, float) and not exact:
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return format_value(value)


def _markdown_table(header: Sequence[str], body: Sequence[Sequence[Any]], exact: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(v, h in exact) for h, v in zip(header, line)) + " |" for line in body]


def write_results(
    spec: ml_collections.ConfigDict, points: Sequence[Point], rows: Sequence[dict], workdir: str | Path
) -> tuple[Path, Path]:
    """DIR/results.csv (every final metric, full precision) and DIR/results.md (the sweep's metric
    and `HEADLINE_METRICS` to 4 decimals, plus the mean over seeds when there are several)."""
    workdir = Path(workdir)
    columns = _columns(spec, points, rows)
    fields = [field for field, _ in points[0].values] if points else []
    csv_path = workdir / "results.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: format_value(v) if isinstance(v, (tuple, list)) else v for k, v in row.items()})

    finished = sum(r["status"] == "finished" for r in rows)
    lines = [f"# Sweep: {spec.metric}", "", f"base `{spec.base}`, {len(rows)} points, {finished} finished.", ""]
    shown = [c for c in columns[1:] if not c.startswith("eval/") or c == spec.metric or c in HEADLINE_METRICS]
    lines += _markdown_table(shown, [[row.get(c) for c in shown] for row in rows], exact=fields)
    if spec.seeds and len(spec.seeds) > 1:
        groups = group_over_seeds(spec, points, rows)
        others = [f for f in fields if f != "seed"]
        lines += ["", f"## {spec.metric}: mean ± standard deviation over seeds", ""]
        body = [[g[f] for f in others] + [g["mean"], g["std"], g["n"]] for g in groups]
        lines += _markdown_table([*others, "mean", "std", "seeds"], body, exact=others)
    md_path = workdir / "results.md"
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_sweep(
    spec: ml_collections.ConfigDict, points: Sequence[Point], rows: Sequence[dict], workdir: str | Path
) -> list[Path]:
    """DIR/plots/curves.png (metric against step, every point that has metrics) and, for each swept
    field other than the seed with at least two values, DIR/plots/final_vs_<field>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bond.metrics import read_metrics

    out = Path(workdir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    fields = [field for field, _ in points[0].values if field != "seed"] if points else []
    label = lambda point: ",".join(f"{f}={format_value(point.value(f))}" for f in fields) or "base"
    groups = list(dict.fromkeys(label(p) for p in points))
    colors = {g: plt.get_cmap("viridis")(i / max(len(groups) - 1, 1)) for i, g in enumerate(groups)}

    fig, ax = plt.subplots(figsize=(6, 4))
    labelled = set()
    for point in points:
        path = point_dir(workdir, point) / "metrics.jsonl"
        if not path.is_file():
            continue
        series = [(r["step"], r[spec.metric]) for r in read_metrics(path) if spec.metric in r]
        if series:
            group = label(point)
            ax.plot(*zip(*series), marker=".", color=colors[group], label=None if group in labelled else group)
            labelled.add(group)
    ax.set_xlabel("step")
    ax.set_ylabel(spec.metric)
    ax.set_title(f"{spec.metric} of every point", fontsize=10)
    ax.grid(alpha=0.3)
    if labelled:
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [out / "curves.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    for field in fields:
        values = list(dict.fromkeys(p.value(field) for p in points))
        if len(values) < 2:
            continue
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        position = (lambda v: v) if numeric else (lambda v: values.index(v))
        others = [f for f in fields if f != field]
        fig, ax = plt.subplots(figsize=(5, 3.8))
        lines: dict[tuple, dict[Any, list[float]]] = {}
        for point, row in zip(points, rows):
            if spec.metric not in row:
                continue
            key = tuple(point.value(f) for f in others)
            lines.setdefault(key, {}).setdefault(point.value(field), []).append(row[spec.metric])
        for key, by_value in lines.items():
            name = ",".join(f"{f}={format_value(v)}" for f, v in zip(others, key)) or spec.metric
            xs = [v for v in values if v in by_value]
            means = [sum(by_value[v]) / len(by_value[v]) for v in xs]
            line = ax.plot([position(v) for v in xs], means, marker="o", label=name)
            for v in xs:
                ax.scatter([position(v)] * len(by_value[v]), by_value[v], s=12, color=line[0].get_color(), alpha=0.5)
        if not numeric:
            ax.set_xticks(range(len(values)), [format_value(v) for v in values])
        ax.set_xlabel(field)
        ax.set_ylabel(f"final {spec.metric}")
        ax.set_title(f"final {spec.metric} against {field} (dots: seeds, line: mean)", fontsize=9)
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / f"final_vs_{field}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str]) -> None:
    from absl import flags

    from bond.validation import ConfigError

    del argv
    spec = flags.FLAGS.config
    spec = ml_collections.ConfigDict(spec.to_dict())  # unlocked copy
    spec.overrides = tuple(spec.overrides) + tuple(flags.FLAGS.set)
    try:
        plan_sweep(spec)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"sweep error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        rows = run_sweep(spec, flags.FLAGS.workdir, jobs=flags.FLAGS.jobs)
    except KeyboardInterrupt:
        print("sweep stopped; rerun the same command to continue where it stopped.", file=sys.stderr)
        sys.exit(130)
    workdir = Path(flags.FLAGS.workdir)
    print((workdir / "results.md").read_text())
    print(f"Results in {workdir}: results.csv, results.md, plots/, points/")
    if any(r["status"] != "finished" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Sweep file (configs/sweeps/*.py, get_config).", lock_config=False)
    flags.DEFINE_string("workdir", None, "Sweep folder: points/, results.csv, results.md, plots/.")
    flags.DEFINE_integer("jobs", None, "Points run at once in processes mode; default: the number of cores.")
    flags.DEFINE_multi_string("set", [], "A 'field=value' override of the base config, for every point (repeatable).")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
