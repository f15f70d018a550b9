"""What every experiment script shares: its command line, training runs, and result files.

An experiment is a module `experiments/<name>.py` with

    NAME = "<name>"                       # also the stem of its result files
    def run(out: Path, quick: bool) -> dict   # trains/computes, writes <out>/<name>.png, returns numbers
    if __name__ == "__main__": common.main(NAME, run)

and is run as `python -m experiments.<name> [--quick] [--out DIR]`. `main` times `run` and writes
`<out>/<name>.json`: the returned numbers with the mode and the runtime. `--quick` is the small
budget that checks the pipeline end to end (the test suite runs it); the full mode is the budget
whose numbers `experiments/README.md` reports.

Training goes through the runner (`train_runs`): each run is a `bond.train.run` folder under
`<out>/runs/<name>/<label>`, so an interrupted experiment resumes where it stopped (finished runs
are skipped, cut ones resume from their checkpoints), and runs that differ only in traced
hyperparameters train together as one population program (bond/population.py).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from bond import population, train  # noqa: E402
from bond.config_base import load_config, set_field  # noqa: E402
from bond.metrics import read_metrics  # noqa: E402
from bond.sweep import is_finished, population_groups  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "experiments" / "results"
# The quick budget's training length: a curve's two ends (step 0 and the last step) are all the
# quick checks read; the claims come from the full budgets.
QUICK_STEPS = 10


def config(spec: str, quick: bool, **overrides: Any) -> ml_collections.ConfigDict:
    """The config of `configs/<spec>` (e.g. "j_bond.py" or "wind.py:kl"), with `quick` appended to
    its variants in quick mode, then `overrides` ({"algo.n": 4, "steps": 100}) applied."""
    path, _, arg = spec.partition(":")
    variants = [a for a in arg.split(",") if a] + (["quick"] if quick else [])
    c = load_config(f"{ROOT / 'configs' / path}:{','.join(variants)}")
    c.plots = False
    for field, value in overrides.items():
        set_field(c, field, value)
    return c


def quick_steps(quick: bool) -> dict[str, int]:
    """{"steps": QUICK_STEPS} in quick mode (an override of the config's own quick length), else {}."""
    return {"steps": QUICK_STEPS} if quick else {}


def seeds(quick: bool) -> tuple[int, ...]:
    """The seeds an experiment trains each configuration with: 0, 1 and 2 in full mode (its numbers
    are reported as mean ± standard error over them), 0 in quick mode."""
    return (0,) if quick else (0, 1, 2)


def seed_label(base: str, seed: int) -> str:
    """The label of the run of configuration `base` with `seed`; seed 0 keeps the bare label."""
    return base if seed == 0 else f"{base}_seed{seed}"


def mean_and_standard_error(values: Sequence[float]) -> dict[str, Any]:
    """Mean over seeds, its standard error (sample std / √seeds; None for one seed) and the values."""
    values = np.asarray(values, float)
    se = float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else None
    return {"mean": float(values.mean()), "se": se, "per_seed": values.tolist()}


def across_seeds(summaries: Mapping[str, Mapping[str, float]], bases: Sequence[str],
                 seeds: Sequence[int]) -> dict[str, dict[str, Any]]:
    """base label → each number of its runs' summaries (label → {name: value}) as mean ± standard
    error over `seeds` (the runs `seed_label(base, seed)`)."""
    out = {}
    for base in bases:
        rows = [summaries[seed_label(base, s)] for s in seeds]
        out[base] = {key: mean_and_standard_error([r[key] for r in rows]) for key in rows[0]}
    return out


def run_overrides(steps: int, eval_every: int, checkpoint_every: int, seed: int) -> dict[str, Any]:
    """The budget fields an experiment's runs share, on one device (the numbers do not depend on the
    device count; a test's fake devices would only pad populations)."""
    return {"steps": steps, "eval.every": eval_every, "checkpoint.every": checkpoint_every, "seed": seed,
            "num_devices": 1}


def train_runs(
    configs: Mapping[str, ml_collections.ConfigDict], root: Path, log: Callable[[str], None] = print
) -> dict[str, list[dict]]:
    """Trains every config (label → config) into root/<label>; returns label → its eval history.

    Finished runs (summary.json present) are not retrained. Configs that may share one program
    (`bond.sweep.population_groups`) train as one population, the others one after another.
    """
    root = Path(root)
    pending = [label for label in configs if not is_finished(root / label)]
    for group in population_groups([configs[label] for label in pending]):
        labels = [pending[i] for i in group]
        if len(labels) == 1:
            train.run(configs[labels[0]], root / labels[0], log=log)
        else:
            population.run_population([configs[l] for l in labels], [root / l for l in labels], log=log)
    return {label: eval_history(root / label) for label in configs}


def eval_history(run_dir: Path) -> list[dict]:
    """The evaluation rows of a run folder's metrics.jsonl: [{"step": s, "eval/reward": ..., ...}]."""
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    return [r for r in rows if any(k.startswith("eval/") for k in r)]


def series(history: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric over an eval history."""
    points = [(r["step"], r[key]) for r in history if key in r]
    return np.array([p[0] for p in points]), np.array([p[1] for p in points], dtype=float)


def final(history: Sequence[dict], key: str) -> float:
    """The metric's value at the last evaluation."""
    return float(series(history, key)[1][-1])


def check_run_curves(runs: Mapping[str, Mapping[str, Any]], expected: set[str] | None, points: int,
                     keys: Sequence[str] = ("steps", "reward", "kl_policy_ref")) -> None:
    """Asserts that `runs` (label → {key: curve}) has exactly the `expected` labels (None: at least
    one run), each curve of `keys` `points` finite values, KL(π‖π_ref) ≥ 0 and 0 at the first
    evaluation (every run starts at π_ref)."""
    if expected is None:
        assert runs, "no training runs"
    else:
        assert set(runs) == expected, f"runs {sorted(runs)} != {sorted(expected)}"
    for label, run_ in runs.items():
        for key in keys:
            values = np.asarray(run_[key], float)
            assert values.shape == (points,), f"{label}.{key} has {values.shape} points, expected {points}"
            assert np.all(np.isfinite(values)), f"{label}.{key} is not finite"
        assert np.all(np.asarray(run_["kl_policy_ref"]) >= -1e-4), f"{label}: KL(π‖π_ref) < 0"
        assert abs(run_["kl_policy_ref"][0]) < 1e-4, f"{label} does not start at π_ref"


def save_figure(fig: plt.Figure, out: Path, name: str) -> Path:
    """Writes `fig` as <out>/<name>.png and closes it."""
    path = Path(out) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def to_jsonable(value: Any) -> Any:
    """numpy/jax scalars and arrays → Python floats and lists, recursively."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def write_results(out: Path, name: str, results: Mapping[str, Any], quick: bool, runtime_s: float) -> Path:
    """Writes <out>/<name>.json: {"experiment", "mode", "runtime_s", **results}."""
    path = Path(out) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"experiment": name, "mode": "quick" if quick else "full", "runtime_s": round(runtime_s, 1)}
    record.update(to_jsonable(dict(results)))
    path.write_text(json.dumps(record, indent=1))
    return path


def run_experiment(name: str, run: Callable[[Path, bool], dict], out: Path, quick: bool) -> dict:
    """Runs one experiment into `out`, timing it; writes and returns its JSON record."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = run(out, quick)
    path = write_results(out, name, results, quick, time.perf_counter() - start)
    return json.loads(path.read_text())


def parse_args(argv: Sequence[str] | None = None, description: str = "") -> argparse.Namespace:
    """--quick (small budget) and --out DIR (default experiments/results)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="the small budget that checks the pipeline")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where figures and JSON files go")
    return parser.parse_args(argv)


def main(name: str, run: Callable[[Path, bool], dict], argv: Sequence[str] | None = None) -> None:
    """The command line of one experiment: `python -m experiments.<name> [--quick] [--out DIR]`."""
    args = parse_args(argv, description=f"Experiment {name}")
    record = run_experiment(name, run, args.out, args.quick)
    print(f"{name}: {record['mode']} run in {record['runtime_s']} s -> {args.out / name}.json, {args.out / name}.png")
