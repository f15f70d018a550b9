"""Population training (bond/population.py): each member equals its separate `train.run`.

Tiny runs (one layer, d 32, 10 steps of 8 prompts, exact evaluation on two prompts) against a
reference pretrained briefly into a module cache: the tests compare runs with each other, so the
reference's quality does not matter. The tolerance 1e-5 covers float32 rounding of the batched
(vmapped) matmuls; the runs' values are O(1).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bond import population, train
from bond.checkpoint import Checkpointer, common_steps
from bond.config_base import load_config, set_field
from bond.context import build_context
from bond.metrics import read_metrics
from bond.plots import read_reference_front

ROOT = Path(__file__).resolve().parents[1]
QUIET = lambda _: None


def tiny(cache_dir: str, config: str = "j_bond", **fields) -> "ml_collections.ConfigDict":  # noqa: F821
    """configs/<config>.py:quick shrunk to seconds; `fields` are dotted paths → values."""
    c = load_config(f"{ROOT / 'configs' / config}.py:quick")
    c.cache_dir = cache_dir
    c.model.update(num_layers=1, d_model=32, num_heads=2, d_ff=64)
    c.reference.update(steps=30, corpus_size=2000, batch_size=64)
    c.update(steps=10, batch_size=8, log_every=5, num_devices=1)
    c.eval.update(every=5, num_prompts=2)
    c.checkpoint.every = 5
    for path, value in fields.items():
        set_field(c, path, value)
    return c


# Two members differing in every kind of traced value (seed, η, γ, learning-rate scale), and one
# whose learning rate blows it up.
MEMBERS = {
    "a": {},
    "b": {"seed": 1, "anchor.eta": 0.1, "algo.gamma": 0.5, "lr_scale": 2.0},
    "bad": {"learning_rate": 1e30},
}


@pytest.fixture(scope="module")
def population_run(cache_dir, tmp_path_factory):
    """The three members as one population on a (2, 1, 1) mesh of fake devices (the population
    axis padded to 4 and split over 'data'): (workdirs, results)."""
    root = tmp_path_factory.mktemp("population")
    workdirs = {name: root / name for name in MEMBERS}
    configs = [tiny(cache_dir, num_devices=2, mesh_shape=(2, 1, 1), **fields) for fields in MEMBERS.values()]
    results = population.run_population(configs, list(workdirs.values()), QUIET)
    return workdirs, dict(zip(MEMBERS, results))


def assert_same_metrics(rows, expected, atol=1e-5):
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    for row, want in zip(rows, expected):
        assert sorted(row) == sorted(want), row["step"]
        for key in want:
            np.testing.assert_allclose(row[key], want[key], rtol=0, atol=atol, err_msg=f"step {row['step']} {key}")


def test_population_member_equals_its_separate_run(population_run, cache_dir, tmp_path):
    """Member b (seed, η, γ and learning-rate scale all differ from the defaults), trained in the
    population of three, against its own `train.run` on the same two devices (where the batch,
    not the population, is split). tests/test_sweep.py compares a population member with its own
    `python -m bond.main` process on one device."""
    workdirs, results = population_run
    separate = train.run(tiny(cache_dir, num_devices=2, mesh_shape=(2, 1, 1), **MEMBERS["b"]), tmp_path, log=QUIET)
    assert_same_metrics(read_metrics(workdirs["b"] / "metrics.jsonl"), read_metrics(tmp_path / "metrics.jsonl"))
    member_summary = json.loads((workdirs["b"] / "summary.json").read_text())
    assert member_summary == results["b"]
    assert sorted(member_summary["after"]) == sorted(separate["after"])
    for key, value in separate["after"].items():
        assert member_summary["after"][key] == pytest.approx(value, abs=1e-5), key
    # The same files: config, the reference's exact trade-offs, checkpoint steps.
    assert json.loads((workdirs["b"] / "config.json").read_text()) == json.loads((tmp_path / "config.json").read_text())
    member_front, separate_front = (read_reference_front(d) for d in (workdirs["b"], tmp_path))
    assert member_front["bon"]["n"] == separate_front["bon"]["n"] == [2, 4, 8, 16]
    for part, key in [("bon", "kl"), ("bon", "reward"), ("front", "kl"), ("front", "reward")]:
        np.testing.assert_allclose(member_front[part][key], separate_front[part][key], rtol=1e-5, atol=1e-7)
    steps = lambda d: sorted(int(p.name) for p in (d / "checkpoints").iterdir() if p.name.isdigit())
    assert steps(workdirs["b"]) == steps(tmp_path) == [5, 10]


def test_population_nonfinite_member_stops_alone(population_run):
    """The blown-up member gets train.run's message and no summary; the others finish."""
    workdirs, results = population_run
    assert set(results["bad"]) == {"error"}
    assert "Non-finite metric at step" in results["bad"]["error"]
    assert not (workdirs["bad"] / "summary.json").exists()
    assert not (workdirs["bad"] / "checkpoints" / "10").exists()
    assert "after" in results["a"] and "after" in results["b"]


def test_population_resumes_from_the_common_checkpoint(population_run, cache_dir, tmp_path):
    """A population of a, b and a second copy of a, killed after the a's saved step 10 but before
    b did (and before the summaries): rerun, it restarts every member from step 5 and ends with
    the uninterrupted run's metrics. (Same traced-only config and size as the fixture: the
    compiled step is reused.)"""
    workdirs, _ = population_run
    names = ["a", "b", "a"]
    killed = [tmp_path / f"{i}-{name}" for i, name in enumerate(names)]
    for name, workdir in zip(names, killed):
        shutil.copytree(workdirs[name], workdir)
        (workdir / "summary.json").unlink()
    shutil.rmtree(killed[1] / "checkpoints" / "10")
    with open(killed[1] / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "train/lo')  # a line cut by the kill
    with Checkpointer(killed[0] / "checkpoints", keep=3) as a, \
            Checkpointer(killed[1] / "checkpoints", keep=3) as b:
        assert a.all_steps() == [5, 10] and b.all_steps() == [5]
        assert common_steps([a, b]) == [5]
    configs = [tiny(cache_dir, num_devices=2, mesh_shape=(2, 1, 1), **MEMBERS[name]) for name in names]
    population.run_population(configs, killed, QUIET)
    for name, workdir in zip(names, killed):
        assert_same_metrics(read_metrics(workdir / "metrics.jsonl"), read_metrics(workdirs[name] / "metrics.jsonl"))
        assert (workdir / "summary.json").exists()


def test_population_padding_and_sharding_layout(cache_dir):
    """3 members on a data axis of 2 pad to 4; the stacked leaves are split on their leading axis."""
    import jax
    from jax.sharding import PartitionSpec

    context = build_context(tiny(cache_dir, num_devices=2, mesh_shape=(2, 1, 1)), QUIET, split_batch=False)
    assert population.padded_size(3, context.setup.mesh) == 4
    state = jax.device_put(population.broadcast_tree(context.state, 4), population.population_sharding(context.setup.mesh))
    leaf = jax.tree.leaves(state.params)[0]
    assert leaf.shape[0] == 4 and leaf.sharding.spec == PartitionSpec("data")
    assert {d.id for d in leaf.sharding.device_set} == {0, 1}
    np.testing.assert_array_equal(np.asarray(leaf[3]), np.asarray(jax.tree.leaves(context.fixed.reference)[0]))


def test_population_rejects_configs_that_change_the_program(cache_dir):
    configs = [tiny(cache_dir), tiny(cache_dir, **{"algo.num_samples": 2})]
    with pytest.raises(ValueError, match=r"config\.algo\.num_samples differs"):
        population.check_population(configs)
    population.check_population([tiny(cache_dir, **fields) for fields in MEMBERS.values()])  # traced only: fine
    assert population.varied_fields([tiny(cache_dir), tiny(cache_dir, seed=3)]) == {"seed": [0, 3]}
    with pytest.raises(ValueError, match="one workdir per config"):
        population.run_population(configs[:1], [], QUIET)
