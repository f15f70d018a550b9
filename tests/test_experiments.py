"""`python -m experiments.all --quick` runs every experiment of experiments/README.md end to end.

The quick modes run in two subprocesses, one per test file (this one and
tests/test_experiments_second_half.py; test_time's runs shrunk in tests/test_test_time.py), so that the suite's two workers share them; each with a
fresh stage cache, on the machine's real device count (the test session's eight fake devices
would only slow it), and with JAX's persistent compilation cache on, so that the programs several
experiments share (the exact evaluator, samplers of the same shapes) compile once. Each
experiment's record then goes through that experiment's own `check`: the invariants that hold at
any budget (exact KL under its bound, probabilities summing to one, curves of the expected length,
every number finite), not the papers' claims, which the full runs report whether they agree or not.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import xla_flags
from experiments.all import EXPERIMENTS

ROOT = Path(__file__).resolve().parents[1]
# About half of the quick modes' time each (2 cores, 2026-12: 120 s and 157 s).
FIRST_HALF = ("bon_theory", "jeffreys", "n_sweep", "quantile_estimation", "iterative_bond", "rejection_sampling", "lora")
# tests/test_test_time.py runs test_time's quick mode on the tests' tiny model, checked by its `check`.
TESTED_ELSEWHERE = ("test_time",)
SECOND_HALF = tuple(name for name in EXPERIMENTS if name not in FIRST_HALF + TESTED_ELSEWHERE)


def run_quick(out: Path, names: tuple[str, ...]) -> Path:
    """`python -m experiments.all --quick --only=<names>` into out/results, which then lists exactly
    `names` in all.json; returns that folder."""
    env = dict(
        os.environ, BOND_CACHE=str(out / "cache"), MPLBACKEND="Agg", XLA_FLAGS=xla_flags(),
        JAX_COMPILATION_CACHE_DIR=str(out / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2",
    )
    result = subprocess.run(
        [sys.executable, "-m", "experiments.all", "--quick", "--out", str(out / "results"), f"--only={','.join(names)}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    summary = json.loads((out / "results" / "all.json").read_text())
    assert list(summary["experiments"]) == list(names)
    return out / "results"


def check_records(results: Path, names: tuple[str, ...]) -> None:
    """Every experiment wrote its figure and quick record, and the record passes its own `check`."""
    for name in names:
        assert (results / f"{name}.png").stat().st_size > 1000, name
        record = json.loads((results / f"{name}.json").read_text())
        assert record["experiment"] == name and record["mode"] == "quick"
        importlib.import_module(f"experiments.{name}").check(record)


def test_the_halves_cover_every_experiment_once():
    covered = FIRST_HALF + SECOND_HALF + TESTED_ELSEWHERE
    assert sorted(covered) == sorted(EXPERIMENTS) and len(set(covered)) == len(covered)


@pytest.mark.parametrize("name", FIRST_HALF)
def test_experiment_quick_record_passes_its_checks(quick_first_half, name):
    check_records(quick_first_half, (name,))


@pytest.fixture(scope="module")
def quick_first_half(tmp_path_factory) -> Path:
    return run_quick(tmp_path_factory.mktemp("experiments"), FIRST_HALF)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_committed_full_results_pass_their_checks(name):
    """The full runs' records behind experiments/README.md's numbers (experiments/results/) pass
    their experiment's `check` as the code reads them now."""
    record = json.loads((ROOT / "experiments" / "results" / f"{name}.json").read_text())
    assert record["experiment"] == name and record["mode"] == "full"
    importlib.import_module(f"experiments.{name}").check(record)
    assert (ROOT / "experiments" / "results" / f"{name}.png").stat().st_size > 1000
