"""Test-time BOND: distil Best-of-N into a per-prompt copy of the policy, and when it beats sampling.

To draw M samples of Best-of-N for one prompt, best-of-N sampling spends M·N reward queries.
Test-time BOND (bond/test_time.py) spends Q queries once, adapting a copy of the policy to the
prompt; its samples are then free, but it only approximates π_BoN(N). Here every eval prompt of
the toy language gets its own copy, adapted from π_ref by configs/bond.py (Jeffreys β = 0.5,
4 policy samples per row, 4 rows per step, the quantiles and best-of-N sample from max(16, N)
reference samples drawn once per prompt) with N ∈ {4, 16, 64, 256}, and evaluated exactly after
the steps that fit each budget Q ∈ {64, 256, 1024, 4096, 16384} queries per prompt (one run per N
and seed, evaluated at the budgets' steps). A budget below the reference samples' cost (N = 64 at
Q = 64, N = 256 at Q ≤ 256) is infeasible: the copy cannot even define its target.

The crossover. Best-of-N sampling is exact; the copy reaches KL(π‖π_BoN(N)) = ε. Two comparisons:
  at N:       M*_N = Q / N — beyond it the copy is cheaper than best-of-N sampling, at the copy's
              accuracy ε, not at best-of-N's own (zero error);
  matched:    the best-of-N' sampler with N' ≤ N that is as close to π_BoN(N) as the copy
              (the smallest N' with KL(π_BoN(N')‖π_BoN(N)) ≤ ε, exact) costs M·N' for M samples,
              and none for N' = 1 (π_ref itself); M*_matched = Q / N', infinite when N' = 1: then
              best-of-N sampling at the copy's accuracy stays cheaper for every M.

Full mode also adapts, in the same way, a trained J-BOND policy (configs/j_bond.py, 300 steps;
one seed), still towards π_BoN(N) of π_ref.

    python -m experiments.test_time [--quick] [--out DIR]
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import ml_collections
import numpy as np

from bond import bon, test_time
from bond.context import make_setup
from experiments import common

NAME = "test_time"
CONFIG = "bond.py"
ROWS = 4
NS_FULL, NS_QUICK = (4, 16, 64, 256), (4, 16)
BUDGETS_FULL, BUDGETS_QUICK = (64, 256, 1024, 4096, 16384), (64, 256)
SEEDS_FULL, SEEDS_QUICK = (0, 1, 2), (0,)
METRICS = ("kl_policy_bon", "kl_bon_policy", "reward", "win_rate_vs_ref", "kl_policy_ref")


def grid(quick: bool) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(Ns, budgets, seeds) of the mode."""
    return (NS_QUICK, BUDGETS_QUICK, SEEDS_QUICK) if quick else (NS_FULL, BUDGETS_FULL, SEEDS_FULL)


def matched_n(kl_bon_to_target: np.ndarray, epsilon: float) -> int:
    """The smallest N' (index + 1 into `kl_bon_to_target`, KL(π_BoN(N')‖π_BoN(N)) for N' = 1..N)
    whose best-of-N' distribution is as close to π_BoN(N) as `epsilon`."""
    return int(np.argmax(np.asarray(kl_bon_to_target) <= epsilon)) + 1


_bon_log_probs = jax.jit(bon.bon_log_probs)  # compiled once per table shape, N traced


def bon_to_target(tables: test_time.ExactTables, n: int) -> np.ndarray:
    """Mean over prompts of the exact KL(π_BoN(N')‖π_BoN(N)) for N' = 1..N."""
    ref_probs = np.exp(np.asarray(tables.ref_logprobs, np.float64))
    ref_probs /= ref_probs.sum(-1, keepdims=True)
    rewards = np.asarray(tables.rewards)
    target = np.asarray(_bon_log_probs(ref_probs, rewards, float(n)))
    out = []
    for m in range(1, n + 1):
        log_q = np.asarray(_bon_log_probs(ref_probs, rewards, float(m)))
        out.append(float(np.mean(bon.kl_divergence_from_logs(log_q, target))))
    return np.maximum(np.asarray(out), 0.0)


def adapt_curves(setup, ref_params, start_params, prompts, tables, n: int, budgets, seeds) -> dict:
    """For each budget, the copies' exact metrics after the steps it pays for, per seed."""
    count = test_time.query_count(setup, ROWS)
    steps = [count.steps_within(q) for q in budgets]
    per_seed = []
    for seed in seeds:
        seed_setup = dataclasses.replace(setup, config=_with_seed(setup.config, seed))
        adaptation = test_time.prepare(seed_setup, ref_params, start_params, prompts, rows=ROWS)
        rows = []
        for k in steps:
            if k is None:
                rows.append(None)
                continue
            adaptation.advance(k - adaptation.steps)
            m = tables.metrics(adaptation.params(), (n,))["mean"]
            rows.append({"kl_policy_bon": m[f"kl_policy_bon{n}"], "kl_bon_policy": m[f"kl_bon{n}_policy"],
                         "reward": m["reward"], "win_rate_vs_ref": m["win_rate_vs_ref"],
                         "kl_policy_ref": m["kl_policy_ref"]})
        per_seed.append(rows)
    curves = {"budgets": list(budgets), "steps": steps, "queries": [None if k is None else count.total(k) for k in steps]}
    for key in METRICS:
        values = np.array([[np.nan if r is None else r[key] for r in rows] for rows in per_seed])
        curves[key] = {"mean": np.nanmean(values, 0) if np.isfinite(values).any() else values[0],
                       "std": np.nanstd(values, 0) if np.isfinite(values).any() else values[0],
                       "per_seed": values}
    return curves


def _with_seed(config, seed: int) -> ml_collections.FrozenConfigDict:
    """`config` with config.seed = `seed` (a traced field: the copies share one program)."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.seed = seed
    return ml_collections.FrozenConfigDict(c)


def crossover(curves: dict, n: int, kl_to_target: np.ndarray) -> list[dict]:
    """Per budget: the copy's accuracy ε, M*_N = Q/N, the matched N' and M*_matched (None = never)."""
    out = []
    for q, queries, eps in zip(curves["budgets"], curves["queries"], curves["kl_policy_bon"]["mean"]):
        if queries is None or not np.isfinite(eps):
            out.append({"budget": q, "feasible": False})
            continue
        n_eq = matched_n(kl_to_target, float(eps))
        out.append({"budget": q, "feasible": True, "queries": queries, "epsilon": float(eps),
                    "m_star_at_n": queries / n, "matched_n": n_eq,
                    "m_star_matched": None if n_eq == 1 else queries / n_eq})
    return out


def start_points(quick: bool, out: Path, ref_params, setup) -> dict:
    """Where the copies start: π_ref, and in full mode a trained J-BOND policy."""
    starts = {"reference": ref_params}
    if not quick:
        c = common.config("j_bond.py", quick, **common.run_overrides(300, 100, 100, 0))
        root = Path(out) / "runs" / NAME
        common.train_runs({"j_bond": c}, root)
        starts["j_bond"] = test_time.policy_from_run(setup, ref_params, root / "j_bond")
    return starts


def run(out: Path, quick: bool) -> dict:
    ns, budgets, seeds = grid(quick)
    prompts = None
    record = {"config": CONFIG + (":quick" if quick else ""), "rows": ROWS, "ns": list(ns), "budgets": list(budgets),
              "seeds": list(seeds), "starts": {}}
    tables, starts = None, None
    for n in ns:
        # config.steps only decides which steps log metrics: one value for every N keeps one program per N.
        config = common.config(CONFIG, quick, **{"algo.n": float(n), "num_devices": 1, "steps": 2000})
        setup, ref_params = make_setup(config, print)
        if tables is None:
            prompts = setup.task.prompts("eval", config.eval.num_prompts, 0)
            tables = test_time.ExactTables(setup, ref_params, prompts)
            starts = start_points(quick, out, ref_params, setup)
            record["num_prompts"] = int(prompts.tokens.shape[0])
        kl_to_target = bon_to_target(tables, n)
        bon_reward = float(tables.metrics(test_time.stacked(ref_params, record["num_prompts"]), (n,))["mean"][f"bon{n}_reward"])
        count = test_time.query_count(setup, ROWS)
        for name, params in starts.items():
            start_seeds = seeds if name == "reference" else seeds[:1]  # the trained start: one seed (time)
            print(f"{NAME}: N = {n} from {name}, seeds {list(start_seeds)}", flush=True)
            curves = adapt_curves(setup, ref_params, params, prompts, tables, n, budgets, start_seeds)
            start = tables.metrics(test_time.stacked(params, record["num_prompts"]), (n,))["mean"]
            record["starts"].setdefault(name, {})[str(n)] = {
                "queries_once": count.once, "queries_per_step": count.per_step, "bon_reward": bon_reward,
                "start": {"kl_policy_bon": start[f"kl_policy_bon{n}"], "kl_bon_policy": start[f"kl_bon{n}_policy"],
                          "reward": start["reward"], "win_rate_vs_ref": start["win_rate_vs_ref"]},
                "curves": curves, "crossover": crossover(curves, n, kl_to_target),
            }
        jax.clear_caches()
    plot(record, out)
    return record


def plot(record: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    panels = [("kl_policy_bon", "KL(π‖π_BoN(N)) [nats]", True), ("kl_bon_policy", "KL(π_BoN(N)‖π) [nats]", True),
              ("reward", "reward (dotted: π_BoN(N))", False), ("win_rate_vs_ref", "win rate against π_ref", False)]
    fig, axes = plt.subplots(1, 5, figsize=(25, 4.8))
    styles = {"reference": "-", "j_bond": "--"}
    for si, (start, by_n) in enumerate(record["starts"].items()):
        for i, (n, r) in enumerate(by_n.items()):
            c = r["curves"]
            q = np.array([np.nan if x is None else x for x in c["queries"]], float)
            label = f"N = {n} from {start}"
            for ax, (key, title, log) in zip(axes, panels):
                mean, std = np.asarray(c[key]["mean"], float), np.asarray(c[key]["std"], float)
                ax.errorbar(q, mean, yerr=std, color=f"C{i}", ls=styles.get(start, ":"), marker="o", ms=3,
                            capsize=2, label=label)
                if key == "reward" and si == 0:
                    ax.axhline(r["bon_reward"], color=f"C{i}", ls=":", lw=1)
            m = [x.get("m_star_matched") if x.get("feasible") else None for x in r["crossover"]]
            axes[4].plot(q, [np.nan if v is None else v for v in m], color=f"C{i}", ls=styles.get(start, ":"),
                         marker="o", ms=3, label=label)
    for ax, (key, title, log) in zip(axes, panels):
        ax.set(xscale="log", xlabel="reward queries per prompt Q", title=title)
        if log:
            ax.set_yscale("log")
    axes[4].set(xscale="log", yscale="log", xlabel="reward queries per prompt Q",
                title="M*: samples beyond which the copy is cheaper\nthan best-of-N' sampling at its accuracy")
    axes[0].legend(fontsize=7)
    fig.suptitle("Test-time BOND on the toy language's eval prompts: one copy per prompt, exact evaluation "
                 "(error bars: std over seeds; missing points: infeasible or never cheaper)")
    common.save_figure(fig, out, NAME)


def check(record: dict) -> None:
    ns, budgets = record["ns"], record["budgets"]
    assert record["starts"], "no start point"
    for start, by_n in record["starts"].items():
        assert set(by_n) == {str(n) for n in ns}, f"{start}: Ns missing"
        for n, r in by_n.items():
            c = r["curves"]
            assert c["budgets"] == budgets
            for q, queries, steps in zip(budgets, c["queries"], c["steps"]):
                if queries is None:
                    assert steps is None and r["queries_once"] > q, f"{start} N={n} Q={q}: infeasible without cause"
                else:
                    assert queries == r["queries_once"] + steps * r["queries_per_step"] <= q, f"N={n} Q={q}: miscounted"
                    assert q - queries < r["queries_per_step"], f"N={n} Q={q}: budget not spent"
            for key in METRICS:
                means = [m for m, x in zip(c[key]["mean"], c["queries"]) if x is not None]
                assert np.all(np.isfinite(means)), f"{start} N={n}: {key} not finite"
            assert all(m >= -1e-4 for m in c["kl_policy_bon"]["mean"] if m is not None and np.isfinite(m))
            assert all(0.0 <= w <= 1.0 for w in c["win_rate_vs_ref"]["mean"] if w is not None and np.isfinite(w))
            for x in r["crossover"]:
                if x["feasible"]:
                    assert 1 <= x["matched_n"] <= int(n)
                    assert x["m_star_at_n"] == x["queries"] / int(n)


if __name__ == "__main__":
    common.main(NAME, run)
