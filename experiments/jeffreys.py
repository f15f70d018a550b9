"""BOND's Jeffreys divergence (BOND Fig. 2): forward and backward KL to Best-of-8 during training.

BOND (Sessa et al. 2024, arXiv 2407.14622, §4.3) trains with J_β = (1−β)·KL(π_BoN‖π) + β·KL(π‖π_BoN)
and reports that β = 0.5 keeps both divergences low while either pure KL (β = 0: forward only,
β = 1: backward only) leaves the other one high. Here configs/bond.py (N = 8) trains with
β ∈ {0, 0.5, 1} as one population (β is traced), and the evaluator computes both KLs exactly over
the enumerated response space of the eval prompts (eval/kl_bon8_policy, eval/kl_policy_bon8).
Full mode trains seeds 0, 1 and 2 (all nine runs in one population) and reports the final numbers
as mean ± standard error over the seeds (`across_seeds`); the figure shows seed 0.

    python -m experiments.jeffreys [--quick] [--out DIR]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments import common

NAME = "jeffreys"
CONFIG = "bond.py"
N = 8
BETAS = (0.0, 0.5, 1.0)
FORWARD, BACKWARD = f"eval/kl_bon{N}_policy", f"eval/kl_policy_bon{N}"
METRICS = {
    "forward_kl": FORWARD,  # KL(π_BoN‖π)
    "backward_kl": BACKWARD,  # KL(π‖π_BoN)
    "reward": "eval/reward",
    "kl_policy_ref": "eval/kl_policy_ref",
    "bon_reward": f"eval/bon{N}_reward",
}


def eval_every(quick: bool) -> int:
    """Evaluation period: the quick budget evaluates at its ends only (each exact evaluation
    enumerates every response), the full budget's 300 steps every 20."""
    return common.QUICK_STEPS if quick else 20


def base_labels() -> list[str]:
    """One label per β; its runs are `common.seed_label(label, seed)`."""
    return [f"beta{beta:g}" for beta in BETAS]


def configs(quick: bool) -> dict:
    """label → config: configs/bond.py with N = 8, each β and each seed."""
    return {
        common.seed_label(f"beta{beta:g}", seed): common.config(
            CONFIG, quick, **{"algo.n": float(N), "algo.beta": beta, "eval.bon_ns": (N,), "seed": seed,
                              "eval.every": eval_every(quick), **common.quick_steps(quick)})
        for seed in common.seeds(quick)
        for beta in BETAS
    }


def run(out: Path, quick: bool) -> dict:
    cs = configs(quick)
    histories = common.train_runs(cs, Path(out) / "runs" / NAME)
    runs = {}
    for label, history in histories.items():
        steps, _ = common.series(history, FORWARD)
        runs[label] = {
            "beta": float(cs[label].algo.beta),
            "steps": steps,
            **{name: common.series(history, key)[1] for name, key in METRICS.items()},
        }
        runs[label]["final"] = {name: common.final(history, key) for name, key in METRICS.items()}
        runs[label]["final"]["jeffreys_0.5"] = 0.5 * (runs[label]["final"]["forward_kl"]
                                                      + runs[label]["final"]["backward_kl"])
    record = {
        "config": CONFIG + (":quick" if quick else ""),
        "n": N,
        "steps": int(next(iter(cs.values())).steps),
        "eval_every": eval_every(quick),
        "seeds": sorted({int(c.seed) for c in cs.values()}),
        "runs": runs,
        "across_seeds": common.across_seeds({label: r["final"] for label, r in runs.items()}, base_labels(),
                                            common.seeds(quick)),
    }
    plot(record, out)
    return record


def plot(record: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (
        ("forward_kl", f"forward KL(π_BoN‖π), N = {record['n']}"),
        ("backward_kl", f"backward KL(π‖π_BoN), N = {record['n']}"),
        ("reward", "reward (dotted: exact Best-of-N)"),
    )
    for ax, (key, title) in zip(axes, panels):
        for label in (f"beta{beta:g}" for beta in BETAS):  # seed 0
            r = record["runs"][label]
            ax.plot(r["steps"], r[key], marker="o", ms=3, label=f"β = {r['beta']:g}")
            if key == "reward":
                ax.axhline(r["bon_reward"][0], color="k", ls=":", lw=1)
        ax.set_xlabel("training step")
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("nats (exact)")
    fig.suptitle("BOND with the Jeffreys divergence J_β on the toy language (exact divergences on the eval prompts)")
    common.save_figure(fig, out, NAME)


def check(record: dict) -> None:
    expected_points = record["steps"] // record["eval_every"] + 1
    quick = record["mode"] == "quick"
    assert set(record["runs"]) == set(configs(quick)), f"runs are {sorted(record['runs'])}"
    assert set(record["across_seeds"]) == set(base_labels()), "a β's summary over seeds is missing"
    for label, r in record["runs"].items():
        for key in METRICS:
            values = np.asarray(r[key], float)
            assert len(values) == expected_points, f"{label}: {key} has {len(values)} points, not {expected_points}"
            assert np.all(np.isfinite(values)), f"{label}: {key} not finite"
        for key in ("forward_kl", "backward_kl", "kl_policy_ref"):
            assert np.all(np.asarray(r[key]) >= -1e-4), f"{label}: {key} < 0"
        # At step 0 every run is π_ref, so the KLs equal those of π_ref and agree across β.
        first = {key: r[key][0] for key in ("forward_kl", "backward_kl")}
        reference = next(iter(record["runs"].values()))
        for key, value in first.items():
            assert abs(value - reference[key][0]) < 1e-3, f"{label}: {key} at step 0 differs between runs"
        assert abs(r["kl_policy_ref"][0]) < 1e-4, f"{label}: KL(π‖π_ref) at step 0 is not 0"


if __name__ == "__main__":
    common.main(NAME, run)
