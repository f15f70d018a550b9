"""N sweep (BOND Fig. 3 and 10): BOND's reward and KL(π‖π_ref) during training against exact Best-of-N.

BOND (Sessa et al. 2024, arXiv 2407.14622, §4) distills Best-of-N for N ∈ {2, 4, 8, 16}: the larger
N, the higher the reward and the KL from the reference, and the policies' (KL, reward) trajectories
approach the Best-of-N points of the same N. Here configs/bond.py (Jeffreys, β = 0.5) trains once
per N (N sizes the best-of-N sample, so each N is its own program). The exact Best-of-N points come
from the step-0 evaluation, where π = π_ref: eval/kl_bon{N}_policy is then KL(π_BoN‖π_ref) and
eval/bon{N}_reward is E_{π_BoN}[r], both exact over the enumerated eval responses.

    python -m experiments.n_sweep [--quick] [--out DIR]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bond import bon
from experiments import common

NAME = "n_sweep"
CONFIG = "bond.py"
NS_FULL = (2, 4, 8, 16)
NS_QUICK = (8,)  # each N is a separate program: one in the quick budget


def eval_every(quick: bool) -> int:
    return common.QUICK_STEPS if quick else 25  # quick: its ends only (each exact evaluation enumerates every response)


def configs(quick: bool) -> dict:
    """label → config: configs/bond.py (β = 0.5) for each N, evaluated against Best-of-N for every N."""
    ns = NS_QUICK if quick else NS_FULL
    return {
        f"n{n}": common.config(CONFIG, quick, **{"algo.n": float(n), "eval.bon_ns": NS_FULL,
                                                 "eval.every": eval_every(quick), **common.quick_steps(quick)})
        for n in ns
    }


def run(out: Path, quick: bool) -> dict:
    cs = configs(quick)
    histories = common.train_runs(cs, Path(out) / "runs" / NAME)
    first = next(iter(histories.values()))[0]  # step 0: π = π_ref, the same in every run
    best_of_n = {
        str(n): {
            "kl_bon_ref": first[f"eval/kl_bon{n}_policy"],
            "kl_bound": float(bon.kl_upper_bound(float(n))),
            "reward": first[f"eval/bon{n}_reward"],
        }
        for n in NS_FULL
    }
    runs = {}
    for label, history in histories.items():
        n = int(round(cs[label].algo.n))
        steps, reward = common.series(history, "eval/reward")
        runs[label] = {
            "n": n,
            "steps": steps,
            "reward": reward,
            "kl_policy_ref": common.series(history, "eval/kl_policy_ref")[1],
            "kl_policy_bon": common.series(history, f"eval/kl_policy_bon{n}")[1],
            "kl_bon_policy": common.series(history, f"eval/kl_bon{n}_policy")[1],
            "win_rate_vs_ref": common.series(history, "eval/win_rate_vs_ref")[1],
        }
        runs[label]["final"] = {k: float(runs[label][k][-1]) for k in
                                ("reward", "kl_policy_ref", "kl_policy_bon", "kl_bon_policy", "win_rate_vs_ref")}
    record = {
        "config": CONFIG + (":quick" if quick else ""),
        "beta": float(next(iter(cs.values())).algo.beta),
        "steps": int(next(iter(cs.values())).steps),
        "eval_every": eval_every(quick),
        "seeds": sorted({int(c.seed) for c in cs.values()}),
        "reference_reward": first["eval/reward"],
        "best_of_n": best_of_n,
        "runs": runs,
    }
    plot(record, out)
    return record


def plot(record: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = {n: f"C{i}" for i, n in enumerate(NS_FULL)}
    for label, r in record["runs"].items():
        c, b = colors[r["n"]], record["best_of_n"][str(r["n"])]
        axes[0].plot(r["steps"], r["reward"], color=c, marker="o", ms=3, label=f"BOND N = {r['n']}")
        axes[0].axhline(b["reward"], color=c, ls=":", lw=1)
        axes[1].plot(r["steps"], r["kl_policy_ref"], color=c, marker="o", ms=3, label=f"BOND N = {r['n']}")
        axes[1].axhline(b["kl_bon_ref"], color=c, ls=":", lw=1)
        axes[2].plot(r["kl_policy_ref"], r["reward"], color=c, marker="o", ms=3, label=f"BOND N = {r['n']} (training)")
    bon_kl = [record["best_of_n"][str(n)]["kl_bon_ref"] for n in NS_FULL]
    bon_reward = [record["best_of_n"][str(n)]["reward"] for n in NS_FULL]
    axes[2].plot([0.0, *bon_kl], [record["reference_reward"], *bon_reward], "k--", lw=1)  # from π_ref = Best-of-1
    for n, x, y in zip(NS_FULL, bon_kl, bon_reward):
        axes[2].scatter([x], [y], marker="*", s=160, color=colors[n], edgecolor="k", zorder=5)
        axes[2].annotate(f"BoN {n}", (x, y), textcoords="offset points", xytext=(5, -12), fontsize=8)
    axes[0].set(xlabel="training step", ylabel="reward (exact)", title="reward (dotted: exact Best-of-N)")
    axes[1].set(xlabel="training step", ylabel="KL(π‖π_ref) [nats]", title="KL to reference (dotted: KL(π_BoN‖π_ref))")
    axes[2].set(xlabel="KL(·‖π_ref) [nats]", ylabel="reward", title="reward/KL trade-off (stars: exact Best-of-N)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(f"BOND (Jeffreys β = {record['beta']:g}) for each N on the toy language; exact evaluation on the eval prompts")
    common.save_figure(fig, out, NAME)


def check(record: dict) -> None:
    expected_points = record["steps"] // record["eval_every"] + 1
    assert set(record["best_of_n"]) == {str(n) for n in NS_FULL}, "Best-of-N points missing"
    for n, b in record["best_of_n"].items():
        assert np.isfinite(b["kl_bon_ref"]) and np.isfinite(b["reward"]), f"BoN {n}: not finite"
        assert -1e-4 <= b["kl_bon_ref"] <= b["kl_bound"] + 1e-4, f"BoN {n}: KL(π_BoN‖π_ref) outside [0, bound]"
    bon_rewards = [record["best_of_n"][str(n)]["reward"] for n in NS_FULL]
    assert np.all(np.diff(bon_rewards) > 0), "exact Best-of-N reward not increasing in N"
    common.check_run_curves(record["runs"], None, expected_points,
                            keys=("reward", "kl_policy_ref", "kl_policy_bon", "kl_bon_policy", "win_rate_vs_ref"))
    for label, r in record["runs"].items():
        assert abs(r["reward"][0] - record["reference_reward"]) < 1e-4, f"{label}: step-0 reward is not π_ref's"


if __name__ == "__main__":
    common.main(NAME, run)
