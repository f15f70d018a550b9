"""Sweeps (bond/sweep/): points and names, config overrides, modes, resuming, results and plots.

One test runs a real sweep through the command line (a point in its own `python -m bond.main`
process, another already finished); the population mode's numbers are tested against separate
runs in tests/test_population.py, so here its dispatch runs with a recording stand-in.
"""

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bond import population, sweep
from bond.config_base import base_config, set_field
from bond.metrics import read_metrics
from bond.sweep import product, sweep_config, zipped

ROOT = Path(__file__).resolve().parents[1]
J_BOND = str(ROOT / "configs" / "j_bond.py")
QUIET = lambda _: None


def tiny_overrides(cache_dir: str) -> list[str]:
    """configs/j_bond.py:quick shrunk to seconds (as tests/test_population.py's `tiny`)."""
    return [
        f"cache_dir={cache_dir}", "model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.d_ff=64",
        "reference.steps=30", "reference.corpus_size=2000", "reference.batch_size=64", "steps=10", "batch_size=8",
        "log_every=5", "num_devices=1", "eval.every=5", "eval.num_prompts=2", "checkpoint.every=5",
    ]


def test_sweep_points_are_the_product_of_axes_then_seeds():
    spec = sweep_config(
        base=J_BOND,
        axes=[
            product({"algo.beta": [0.25, 0.5], "algo.gamma": [0, 1]}),
            zipped({"anchor.eta": [0.01, 0.1], "lr_scale": [1.0, 2.0]}),
        ],
        seeds=[0, 3],
    )
    points = sweep.expand_points(spec)
    assert len(points) == 2 * 2 * 2 * 2
    assert [p.name for p in points[:5]] == [
        "algo.beta=0.25,algo.gamma=0,anchor.eta=0.01,lr_scale=1.0,seed=0",
        "algo.beta=0.25,algo.gamma=0,anchor.eta=0.01,lr_scale=1.0,seed=3",
        "algo.beta=0.25,algo.gamma=0,anchor.eta=0.1,lr_scale=2.0,seed=0",
        "algo.beta=0.25,algo.gamma=0,anchor.eta=0.1,lr_scale=2.0,seed=3",
        "algo.beta=0.25,algo.gamma=1,anchor.eta=0.01,lr_scale=1.0,seed=0",
    ]
    assert points[-1].name == "algo.beta=0.5,algo.gamma=1,anchor.eta=0.1,lr_scale=2.0,seed=3"
    config = sweep.point_config(spec, points[-1])
    values = (config.algo.beta, config.algo.gamma, config.anchor.eta, config.lr_scale, config.seed)
    assert values == (0.5, 1.0, 0.1, 2.0, 3)
    assert sweep.expand_points(sweep_config(base=J_BOND, seeds=[])) == [sweep.Point(())]


def test_sweep_overrides_and_point_command():
    spec = sweep_config(base=f"{J_BOND}:quick", axes=[product({"mesh_shape": [(2, 2, 2)]})], seeds=[5],
                        overrides=["steps=7", "algo.preference=bradley_terry"])
    (point,) = sweep.expand_points(spec)
    assert point.name == "mesh_shape=(2,2,2),seed=5"
    config = sweep.point_config(spec, point)
    assert (config.steps, config.algo.preference, tuple(config.mesh_shape), config.seed, config.batch_size) == (
        7, "bradley_terry", (2, 2, 2), 5, 16)
    assert sweep.point_command(spec, point, "/runs/p")[1:] == [
        "-m", "bond.main", f"--config={J_BOND}:quick", "--workdir=/runs/p", "--config.steps=7",
        "--config.algo.preference=bradley_terry", "--config.mesh_shape=(2,2,2)", "--config.seed=5",
    ]
    assert sweep.with_base_args("configs/wind.py:kl", "quick") == "configs/wind.py:kl,quick"
    assert sweep.with_base_args("configs/j_bond.py", "quick") == "configs/j_bond.py:quick"
    assert sweep.with_base_args("configs/j_bond.py", None) == "configs/j_bond.py"


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(axes=[product({"algo.gama": [0.1]})]), "config.algo.gama is not a field"),
        (dict(axes=[product({"algo.gamma": ["big"]})]), "config.algo.gamma='big' has the wrong type"),
        (dict(axes=[zipped({"algo.beta": [0.1, 0.2], "algo.gamma": [1.0]})]), "zips fields of different lengths"),
        (dict(axes=[product({"seed": [1, 2]})]), "swept by more than one axis"),
        (dict(axes=[product({"algo.beta": []})]), "needs a non-empty list of values"),
        (dict(axes=[product({"algo.beta": [0.1, 0.1]})]), "repeated points"),
        (dict(axes=[{"grid": {"algo.beta": [0.1]}}]), "must be product"),
        (dict(mode="parallel"), "mode='parallel' must be one of"),
        (dict(metric="reward"), "must be an evaluation metric"),
        (dict(overrides=["steps"]), "must look like 'field=value'"),
        (dict(base="configs/nope.py"), "no config file 'configs/nope.py'"),
    ],
)
def test_sweep_spec_errors_name_the_problem(changes, message, tmp_path):
    spec = sweep_config(**{"base": J_BOND, **changes})
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(").replace("[", r"\[")):
        sweep.run_sweep(spec, tmp_path, log=QUIET)


def test_sweep_mode_choice():
    spec = sweep_config(base=J_BOND)
    config = lambda field, value: sweep.point_config(spec, sweep.Point(((field, value),)))
    traced = [config("anchor.eta", eta) for eta in (0.01, 0.1)]
    static = [config("algo.num_samples", n) for n in (1, 2)]
    assert sweep.choose_mode("auto", traced) == "population"
    assert sweep.choose_mode("processes", traced) == "processes"
    assert sweep.choose_mode("auto", static) == "processes"
    with pytest.raises(ValueError, match=r"mode='population' is not possible.*config\.algo\.num_samples differs"):
        sweep.choose_mode("population", static)
    for name in ("j_bond_eta", "j_bond_gamma_seeds", "bond_n"):
        spec = sweep.load_sweep(f"configs/sweeps/{name}.py:quick")
        configs = [sweep.point_config(spec, p) for p in sweep.expand_points(spec)]
        assert sweep.choose_mode(spec.mode, configs) == ("processes" if name == "bond_n" else "population"), name


def test_set_field_sets_dotted_fields_and_names_an_unknown_one():
    config = base_config()
    set_field(config, "algo.beta", 0.25)
    set_field(config, "steps", 7)
    assert (config.algo.beta, config.steps) == (0.25, 7)
    for field in ("algo.gama", "algo.beta.x", "nope.beta"):
        with pytest.raises(ValueError, match=rf"config\.{re.escape(field)} is not a field"):
            set_field(config, field, 1.0)
    assert "gama" not in config.algo and "nope" not in config
    with pytest.raises(ValueError, match=r"config\.steps='many' has the wrong type"):
        set_field(config, "steps", "many")


def test_population_groups_split_configs_by_their_other_fields(tmp_path, monkeypatch):
    """Configs that differ only in population fields (η, β, seed; `plots` too) share a group; one that
    differs in another field (algo.num_samples) starts its own, and later configs join the first group
    they fit. `run_in_population` runs each group as its own population."""
    def config(**fields):
        c = base_config()
        for field, value in fields.items():
            set_field(c, field.replace("__", "."), value)
        return c

    configs = [config(anchor__eta=0.01), config(algo__num_samples=2), config(anchor__eta=0.1, seed=3),
               config(algo__num_samples=2, algo__beta=0.25), config(plots=False)]
    assert sweep.population_groups(configs) == [[0, 2, 4], [1, 3]]

    calls = []
    monkeypatch.setattr(population, "run_population",
                        lambda cs, workdirs, log: calls.append([Path(w).name for w in workdirs]) or [{} for _ in cs])
    points = [sweep.Point((("i", i),)) for i in range(len(configs))]
    assert sweep.run_in_population(configs, points, tmp_path, 0, QUIET) == {p.name: None for p in points}
    assert calls == [["i=0", "i=2", "i=4"], ["i=1", "i=3"]]


def fake_point(workdir: Path, name: str, rewards: list[float] | None, error: str | None = None) -> None:
    """A point folder as a run leaves it: eval rows at steps 0 and 10 and summary.json (or error.txt)."""
    run_dir = workdir / "points" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    if rewards is not None:
        rows = [{"step": 0, "eval/reward": rewards[0], "eval/kl_policy_ref": 0.0},
                {"step": 10, "eval/reward": rewards[1], "eval/kl_policy_ref": 0.5}]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary = {"steps": 10, "algorithm": "j_bond", "task": "toy_language",
                   "before": {k: v for k, v in rows[0].items() if k != "step"},
                   "after": {k: v for k, v in rows[1].items() if k != "step"}}
        (run_dir / "summary.json").write_text(json.dumps(summary))
    if error is not None:
        (run_dir / "error.txt").write_text(error)


def test_sweep_results_table_and_plots(tmp_path):
    """η ∈ {0.01, 0.1} × seeds {0, 1}; one point failed. Means and sample standard deviations by hand:
    η = 0.01: rewards 1 and 2 → 1.5 ± 0.7071; η = 0.1: only 4 finished → 4, std undefined."""
    spec = sweep_config(base=J_BOND, axes=[product({"anchor.eta": [0.01, 0.1]})], seeds=[0, 1])
    points = sweep.expand_points(spec)
    fake_point(tmp_path, points[0].name, [0.5, 1.0])
    fake_point(tmp_path, points[1].name, [0.5, 2.0])
    fake_point(tmp_path, points[2].name, [0.5, 4.0])
    fake_point(tmp_path, points[3].name, None, error="exit status 1")
    rows = sweep.collect_results(spec, points, tmp_path)
    csv_path, md_path = sweep.write_results(spec, points, rows, tmp_path)
    with open(csv_path) as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["name", "anchor.eta", "seed", "status", "steps", "eval/reward", "eval/kl_policy_ref"]
    assert [(r["anchor.eta"], r["seed"], r["status"], r["eval/reward"]) for r in table] == [
        ("0.01", "0", "finished", "1.0"), ("0.01", "1", "finished", "2.0"),
        ("0.1", "0", "finished", "4.0"), ("0.1", "1", "failed", ""),
    ]
    groups = sweep.group_over_seeds(spec, points, rows)
    assert groups[0]["anchor.eta"] == 0.01 and groups[0]["n"] == 2
    assert groups[0]["mean"] == 1.5 and groups[0]["std"] == pytest.approx(math.sqrt(0.5), abs=1e-12)
    assert (groups[1]["mean"], groups[1]["n"]) == (4.0, 1) and math.isnan(groups[1]["std"])
    markdown = md_path.read_text()
    assert "| 0.01 | 1.5000 | 0.7071 | 2 |" in markdown and "| 0.1 | 4.0000 | nan | 1 |" in markdown
    paths = sweep.plot_sweep(spec, points, rows, tmp_path)
    assert [p.name for p in paths] == ["curves.png", "final_vs_anchor.eta.png"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_sweep_population_mode_runs_unfinished_points_in_chunks(tmp_path, monkeypatch):
    """The sweep's side of population mode: unfinished points only, `population_size` members per
    population, error.txt for a member that failed, and a rerun that retries only that one.
    (A recording stand-in replaces the training, which tests/test_population.py tests.)"""
    calls, failing = [], {0.1}

    def fake_run_population(configs, workdirs, log):
        calls.append([Path(w).name for w in workdirs])
        results = []
        for config, workdir in zip(configs, workdirs):
            if config.anchor.eta in failing:
                results.append({"error": "Non-finite metric at step 3"})
            else:
                fake_point(Path(workdir).parents[1], Path(workdir).name, [0.0, config.anchor.eta])
                results.append({"after": {"eval/reward": config.anchor.eta}})
        return results

    monkeypatch.setattr(population, "run_population", fake_run_population)
    etas = [0.01, 0.02, 0.05, 0.1]
    spec = sweep_config(base=J_BOND, axes=[product({"anchor.eta": etas})], seeds=[0], population_size=2)
    fake_point(tmp_path, "anchor.eta=0.01,seed=0", [0.0, 0.01])  # finished before
    rows = sweep.run_sweep(spec, tmp_path, log=QUIET)
    assert calls == [["anchor.eta=0.02,seed=0", "anchor.eta=0.05,seed=0"], ["anchor.eta=0.1,seed=0"]]
    assert [r["status"] for r in rows] == ["finished", "finished", "finished", "failed"]
    assert [r.get("eval/reward") for r in rows] == [0.01, 0.02, 0.05, None]
    error = tmp_path / "points" / "anchor.eta=0.1,seed=0" / "error.txt"
    assert error.read_text() == "Non-finite metric at step 3\n"

    calls.clear()
    failing.clear()
    rows = sweep.run_sweep(spec, tmp_path, log=QUIET)
    assert calls == [["anchor.eta=0.1,seed=0"]]
    assert [r["status"] for r in rows] == ["finished"] * 4
    assert not error.exists()


def test_sweep_command_line_runs_only_unfinished_points_as_processes(cache_dir, tmp_path):
    """`python -m bond.sweep` on a two-point sweep whose first point is already finished: only the
    second runs (in its own `python -m bond.main` process, whose config equals `point_config`); the
    results table lists both; rerunning the sweep runs nothing."""
    sweep_file = tmp_path / "eta.py"
    sweep_file.write_text(
        "from bond.sweep import product, sweep_config\n\n"
        "def get_config(arg=None):\n"
        f"    return sweep_config(base={J_BOND + ':quick'!r}, axes=[product({{'anchor.eta': [0.05, 0.1]}})],\n"
        "                        seeds=[0], mode='processes')\n"
    )
    workdir = tmp_path / "sweep"
    fake_point(workdir, "anchor.eta=0.05,seed=0", [0.25, 0.75])
    command = [sys.executable, "-m", "bond.sweep", f"--config={sweep_file}", f"--workdir={workdir}", "--jobs=2"]
    command += [f"--set={text}" for text in tiny_overrides(cache_dir)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout + done.stderr

    finished, ran = workdir / "points" / "anchor.eta=0.05,seed=0", workdir / "points" / "anchor.eta=0.1,seed=0"
    assert not (finished / "log.txt").exists()  # skipped
    spec = sweep.load_sweep(str(sweep_file))
    spec.overrides = tuple(tiny_overrides(cache_dir))
    expected = sweep.point_config(spec, sweep.expand_points(spec)[1])
    assert json.loads((ran / "config.json").read_text()) == json.loads(json.dumps(expected.to_dict()))
    assert (ran / "command.txt").read_text().startswith(sys.executable)
    assert [r["step"] for r in read_metrics(ran / "metrics.jsonl")] == [0, 5, 5, 10, 10]
    with open(workdir / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["anchor.eta"], r["status"]) for r in table] == [("0.05", "finished"), ("0.1", "finished")]
    assert table[0]["eval/reward"] == "0.75"
    assert float(table[1]["eval/reward"]) == json.loads((ran / "summary.json").read_text())["after"]["eval/reward"]
    assert "| anchor.eta | seed | status |" in done.stdout
    assert (workdir / "plots" / "curves.png").exists()

    before = (ran / "metrics.jsonl").stat().st_mtime_ns
    rows = sweep.run_sweep(spec, workdir, log=QUIET)  # everything finished: nothing runs
    assert [r["status"] for r in rows] == ["finished", "finished"]
    assert (ran / "metrics.jsonl").stat().st_mtime_ns == before
