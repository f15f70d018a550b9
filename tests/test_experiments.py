"""`python -m experiments.all --quick` runs every experiment of experiments/README.md end to end.

One subprocess runs all eleven quick modes (their budget is about 20 s each on two cores) with a
fresh stage cache, on the machine's real device count (the test session's eight fake devices
would only slow it), and with JAX's persistent compilation cache on, so that the programs several
experiments share (the exact evaluator, samplers of the same shapes) compile once. Each experiment's record then goes through that experiment's own `check`:
the invariants that hold at any budget (exact KL under its bound, probabilities summing to one,
curves of the expected length, every number finite), not the papers' claims, which the full runs
report whether they agree or not.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.all import EXPERIMENTS
from conftest import xla_flags

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("experiments")
    env = dict(
        os.environ, BOND_CACHE=str(out / "cache"), MPLBACKEND="Agg",
        JAX_COMPILATION_CACHE_DIR=str(out / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2",
    )
    env["XLA_FLAGS"] = xla_flags()
    result = subprocess.run(
        [sys.executable, "-m", "experiments.all", "--quick", "--out", str(out / "results")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out / "results"


def test_experiments_all_quick_writes_every_figure_and_record(quick_results):
    summary = json.loads((quick_results / "all.json").read_text())
    assert list(summary["experiments"]) == list(EXPERIMENTS)
    for name in EXPERIMENTS:
        assert (quick_results / f"{name}.png").stat().st_size > 1000, name
        record = json.loads((quick_results / f"{name}.json").read_text())
        assert record["experiment"] == name and record["mode"] == "quick"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_quick_record_passes_its_checks(quick_results, name):
    record = json.loads((quick_results / f"{name}.json").read_text())
    importlib.import_module(f"experiments.{name}").check(record)
