"""Test-time BOND (bond/test_time.py): the command, exact query counts, and per-prompt copies that
equal their separate runs; and the experiment's quick mode (experiments/test_time.py) on a tiny model.

Tiny setups (one layer, d 32, a reference pretrained for 30 steps into a module cache): the tests
compare runs and counts with each other, so the reference's quality does not matter.
"""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from bond import test_time
from bond.config_base import load_config, set_field
from bond.context import make_setup

ROOT = Path(__file__).resolve().parents[1]
QUIET = lambda _: None
TINY = {"model.num_layers": 1, "model.d_model": 32, "model.num_heads": 2, "model.d_ff": 64,
        "reference.steps": 30, "reference.corpus_size": 2000, "reference.batch_size": 64, "num_devices": 1}


def tiny(cache_dir: str, spec: str = "bond.py:quick", **fields):
    c = load_config(f"{ROOT / 'configs' / spec}")
    c.cache_dir = cache_dir
    for path, value in {**TINY, **fields}.items():
        set_field(c, path, value)
    return c


@pytest.fixture(scope="module")
def bond_setup(cache_dir):
    """BOND with N = 4 (max(k = 16, N) reference samples, cached; 4 policy samples per row), as the
    command test and the experiment test configure it (2 steps): their compiled programs are shared
    through the persistent compilation cache."""
    config = test_time.test_time_config(tiny(cache_dir), steps=2, n=4)
    return make_setup(config, QUIET)


def prompts_of(setup, num):
    return setup.task.prompts("eval", num, 0)


def counting(setup):
    """`setup` whose reward judge adds the number of responses it scores to a host list."""
    scored = []

    def reward_fn(params, rows):
        # One entry per scored response (an array that depends on the rows, so that a vmapped call counts every member's).
        jax.debug.callback(lambda first: scored.append(int(np.size(first))), rows.tokens[:, 0])
        return setup.reward_fn(params, rows)

    return dataclasses.replace(setup, reward_fn=reward_fn), scored


@pytest.mark.parametrize("algorithm", ["bond", "j_bond"])
def test_reward_queries_are_counted_exactly(algorithm, bond_setup, cache_dir):
    """Every response the judge scores, cached reference samples included, is in `query_count`:
    BOND 16 reference samples once + rows·4 policy samples per step; J-BOND rows·(1 policy + 2 anchor)."""
    if algorithm == "bond":
        setup, ref = bond_setup
    else:
        setup, ref = make_setup(tiny(cache_dir, "j_bond.py:quick"), QUIET)
    setup, scored = counting(setup)
    num, rows, steps = 4, 4, 2
    adaptation = test_time.prepare(setup, ref, ref, prompts_of(setup, num), rows=rows).advance(steps)
    jax.block_until_ready(adaptation.state)
    jax.effects_barrier()
    count = test_time.query_count(setup, rows)
    expected = {"bond": (16, rows * 4), "j_bond": (0, rows * 3)}[algorithm]
    assert (count.once, count.per_step) == expected
    assert sum(scored) == num * count.total(steps)
    assert count.steps_within(count.total(steps)) == steps and count.steps_within(count.once - 1) is None


def test_copies_of_a_population_equal_separate_per_prompt_runs(bond_setup):
    """Three prompts adapted as one population against each prompt adapted alone (its member id
    seeds it): the same parameters and exact metrics, to float rounding of batched matmuls."""
    setup, ref = bond_setup
    prompts = prompts_of(setup, 3)
    together = test_time.prepare(setup, ref, ref, prompts, rows=2).advance(2).params()
    tables = test_time.ExactTables(setup, ref, prompts)
    metrics = tables.metrics(together, (4,))["per_prompt"]
    alone_params = []
    for i in range(3):
        one = type(prompts)(prompts.tokens[i:i + 1], prompts.mask[i:i + 1])
        alone_params.append(test_time.prepare(setup, ref, ref, one, rows=2, member_ids=[i]).advance(2).params())
    alone = jax.tree.map(lambda *xs: np.concatenate(xs), *alone_params)
    for a, b in zip(jax.tree.leaves(together), jax.tree.leaves(alone)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    alone_metrics = tables.metrics(alone, (4,))["per_prompt"]
    for key in ("reward", "kl_policy_ref", "kl_policy_bon4", "kl_bon4_policy", "win_rate_vs_ref"):
        np.testing.assert_allclose(metrics[key], alone_metrics[key], rtol=0, atol=1e-5, err_msg=key)
    # The copies moved, and differently: one per prompt.
    first = jax.tree.leaves(together)[0]
    assert not np.allclose(first[0], first[1]) and not np.allclose(first[0], jax.tree.leaves(ref)[0])


def test_command_runs_on_a_tiny_config(cache_dir, tmp_path, capsys):
    """`python -m bond.test_time` (its flags parsed and main run in process) adapts and reports."""
    out = tmp_path / "result.json"
    argv = ["bond.test_time", f"--config={ROOT / 'configs' / 'bond.py'}:quick", f"--config.cache_dir={cache_dir}",
            *[f"--config.{k}={v}" for k, v in TINY.items()], "--num_prompts=4", "--steps=2", "--rows=4", "--n=4",
            f"--out={out}"]
    test_time._parse_or_exit(argv)
    test_time.main([])
    printed = capsys.readouterr().out
    assert "kl_policy_bon4" in printed and "reward queries per prompt: 48" in printed, printed
    result = json.loads(out.read_text())
    # max(k = 16, N = 4) reference samples once, then 4 rows × 4 policy samples per step.
    assert result["queries"]["per_prompt"] == 16 + 2 * 4 * 4
    assert len(result["per_prompt"]["reward"]) == 4
    assert abs(result["before"]["kl_policy_ref"]) < 1e-4 and result["after"]["kl_policy_ref"] > 0


def test_experiment_quick_mode_passes_its_check(cache_dir, tmp_path, monkeypatch):
    """experiments/test_time.py's quick mode on the tiny model (the experiment's own configs,
    shrunk as above, with the tests' 2-step program) at its first N, checked by its `check`."""
    from experiments import common
    from experiments import test_time as experiment

    config = common.config
    shrink = lambda spec, quick, **o: config(spec, quick, **{**TINY, "cache_dir": cache_dir, **o, "steps": 2})
    monkeypatch.setattr(common, "config", shrink)
    monkeypatch.setattr(experiment, "NS_QUICK", experiment.NS_QUICK[:1])
    record = experiment.run(tmp_path, quick=True)
    experiment.check(json.loads(json.dumps(common.to_jsonable(record))))
    assert (tmp_path / "test_time.png").stat().st_size > 1000
