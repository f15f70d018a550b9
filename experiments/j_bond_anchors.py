"""J-BOND's anchor: EMA against a hard anchor of matched period, and the γ regularizer (BOND §6,
Fig. 5 and 6; Sessa et al. 2024, arXiv 2407.14622).

    python -m experiments.j_bond_anchors --out /tmp/bond/results            # full budget
    python -m experiments.j_bond_anchors --quick --out /tmp/experiments     # smoke budget

J-BOND (configs/j_bond.py, β = 0.5) distills Best-of-2 of its anchor. The anchor is either an
EMA of the policy's parameters, θ_a ← (1−η)·θ_a + η·θ, or a hard copy of the policy every K steps.

Matching rule: K = 1/η. The EMA's weights on past policies are η(1−η)^k, k = 0, 1, ..., a
geometric memory whose time constant (mean age of its weights, (1−η)/η ≈ 1/η) is 1/η steps; the
hard anchor with K = 1/η is refreshed once per that time constant (η = 0.01, 0.05, 0.1 → K = 100,
20, 10). Its own lag behind the policy runs from 0 to K−1 steps, (K−1)/2 on average: matching the
mean lag instead would give K ≈ 2/η.

Runs (seeds 0, 1, 2 in full mode, seed 0 in quick mode): the EMA anchor with η ∈ {0.01, 0.05, 0.1} and γ = 0; the γ·KL(π‖π_anchor)
regularizer with γ ∈ {0, 0.5, 1, 2} at η = 0.05; the hard anchor with K = 1/η for each η and γ = 0.
η, γ and the seed are traced, so every EMA run trains in one population program; each K is its own
program (its seeds one population). Reported: exact reward and KL(π‖π_ref) during training, and the
trade-off as the gap to the exact KL-regularized front (experiments/j_bond_vs_reinforce.py, full
mode), as mean ± standard error over the seeds, with each matched pair's EMA − hard difference per
seed. The figure shows seed 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import ml_collections

from bond.exact import FRONT_BETAS, kl_regularized_front
from experiments import common
from experiments.iterative_bond import curves, reference_tables
from experiments.j_bond_vs_reinforce import run_summary

NAME = "j_bond_anchors"
GAMMA_ETA = 0.05  # the η of the γ sweep (configs/j_bond.py's default)


@dataclasses.dataclass(frozen=True)
class Budget:
    """What one mode trains: steps, evaluation interval, the EMA rates, the γ values and the hard anchors."""

    steps: int
    eval_every: int
    etas: tuple[float, ...]  # EMA rates (γ = 0)
    gammas: tuple[float, ...]  # γ at η = GAMMA_ETA
    hard_etas: tuple[float, ...]  # η whose matched hard anchor K = 1/η is trained


FULL = Budget(steps=300, eval_every=25, etas=(0.01, 0.05, 0.1), gammas=(0.0, 0.5, 1.0, 2.0), hard_etas=(0.01, 0.05, 0.1))
# Quick: one EMA population (two η, two γ) and one hard-anchor program.
QUICK = Budget(steps=common.QUICK_STEPS, eval_every=common.QUICK_STEPS, etas=(0.01, 0.1), gammas=(0.0, 1.0), hard_etas=(0.1,))


def budget(quick: bool) -> Budget:
    """The quick or the full budget."""
    return QUICK if quick else FULL


def matched_period(eta: float) -> int:
    """K = round(1/η): a hard copy once per EMA time constant (see the module docstring)."""
    if not 0.0 < eta <= 1.0:
        raise ValueError(f"eta={eta!r} must be in (0, 1].")
    return int(round(1.0 / eta))


def ema_label(eta: float, gamma: float) -> str:
    return f"ema_eta{eta:g}_gamma{gamma:g}"


def hard_label(eta: float) -> str:
    return f"hard_K{matched_period(eta)}_gamma0"


def configurations(b: Budget) -> dict[str, dict[str, Any]]:
    """label → its anchor and γ overrides: the EMA runs (η sweep at γ = 0, γ sweep at η = 0.05), then
    the hard anchors."""
    points = [(eta, 0.0) for eta in b.etas] + [(GAMMA_ETA, gamma) for gamma in b.gammas]
    out = {ema_label(eta, gamma): {"anchor.kind": "ema", "anchor.eta": eta, "algo.gamma": gamma}
           for eta, gamma in dict.fromkeys(points)}
    for eta in b.hard_etas:
        out[hard_label(eta)] = {"anchor.kind": "hard", "anchor.period": matched_period(eta), "algo.gamma": 0.0}
    return out


def base_labels(b: Budget) -> list[str]:
    """One label per configuration (`configurations`)."""
    return list(configurations(b))


def run_configs(quick: bool) -> dict[str, ml_collections.ConfigDict]:
    """label → config: every configuration for every seed of the mode."""
    b = budget(quick)
    configs = {}
    for seed in common.seeds(quick):
        shared = common.run_overrides(b.steps, b.eval_every, checkpoint_every=b.steps if quick else 50, seed=seed)
        for label, overrides in configurations(b).items():
            configs[common.seed_label(label, seed)] = common.config("j_bond.py", quick, **shared, **overrides)
    return configs


def paired_differences(summaries: Mapping[str, Mapping[str, float]], b: Budget, seeds_: tuple[int, ...]) -> dict:
    """Per matched η: EMA minus hard anchor, per seed and as mean ± standard error, of each summary number."""
    out = {}
    for eta in b.hard_etas:
        ema, hard = ema_label(eta, 0.0), hard_label(eta)
        out[f"{eta:g}"] = {
            key: common.mean_and_standard_error([summaries[common.seed_label(ema, s)][key]
                                                 - summaries[common.seed_label(hard, s)][key] for s in seeds_])
            for key in summaries[ema]
        }
    return out


def run(out: Path, quick: bool) -> dict:
    b = budget(quick)
    configs = run_configs(quick)
    histories = common.train_runs(configs, Path(out) / "runs" / NAME)
    runs = {label: curves(h) for label, h in histories.items()}
    # The toy π_ref's tables cost a model load and an exact-evaluation compile: full mode only.
    front = None if quick else kl_regularized_front(*reference_tables(next(iter(configs.values()))), FRONT_BETAS)
    summaries = {label: run_summary(r, front) for label, r in runs.items()}
    results: dict[str, Any] = {
        "seeds": list(common.seeds(quick)),
        "budget": dataclasses.asdict(b),
        "matching_rule": "hard period K = round(1/eta)",
        "eta_pairs": {f"{eta:g}": {"ema": ema_label(eta, 0.0), "hard": hard_label(eta)} for eta in b.hard_etas},
        "gamma_runs": {f"{g:g}": ema_label(GAMMA_ETA, g) for g in b.gammas},
        "runs": runs,
        "summary": summaries,
        "across_seeds": common.across_seeds(summaries, base_labels(b), common.seeds(quick)),
        "ema_minus_hard": paired_differences(summaries, b, common.seeds(quick)),
        "front": front,
    }
    plot(results, b, out)
    return results


def plot(results: Mapping[str, Any], b: Budget, out: Path) -> Path:
    """Row 1: EMA against hard anchors (reward, KL, reward/KL plane). Row 2: the same for γ."""
    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    runs, front = results["runs"], results["front"]

    def draw(row, label, color, style, name):
        r = runs[label]
        axes[row, 0].plot(r["steps"], r["reward"], style, color=color, marker=".", label=name)
        axes[row, 1].plot(r["steps"], r["kl_policy_ref"], style, color=color, marker=".", label=name)
        axes[row, 2].plot(r["kl_policy_ref"], r["reward"], style, color=color, marker=".", label=name)

    for i, eta in enumerate(b.etas):
        draw(0, ema_label(eta, 0.0), f"C{i}", "-", f"EMA η={eta:g}")
        if eta in b.hard_etas:
            draw(0, hard_label(eta), f"C{i}", "--", f"hard K={matched_period(eta)}")
    for i, gamma in enumerate(b.gammas):
        draw(1, ema_label(GAMMA_ETA, gamma), f"C{i + 3}", "-", f"γ={gamma:g} (EMA η={GAMMA_ETA:g})")
    for row, what in ((0, "EMA (—) vs hard anchor K = 1/η (--), γ = 0"), (1, f"γ·KL(π‖π_anchor), EMA η = {GAMMA_ETA:g}")):
        if front is not None:
            max_kl = max(max(runs[label]["kl_policy_ref"]) for label in runs)
            axes[row, 2].plot(front["kl"], front["reward"], "k-", lw=1, label="exact front π_ref·exp(r/β)/Z")
            axes[row, 2].set_xlim(-0.05 * max_kl, 1.08 * max_kl)
        axes[row, 0].set(xlabel="step", ylabel="exact reward", title=f"reward: {what}")
        axes[row, 1].set(xlabel="step", ylabel="exact KL(π‖π_ref)", title="KL to the reference")
        axes[row, 2].set(xlabel="exact KL(π‖π_ref)", ylabel="exact reward", title="reward/KL plane")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return common.save_figure(fig, out, NAME)


def check(record: Mapping[str, Any]) -> None:
    """Invariants of any mode's record: every run present and finite, with the expected number of
    evaluations starting at π_ref, and (with the front) no run above the exact front."""
    b = QUICK if record["mode"] == "quick" else FULL
    common.check_run_curves(record["runs"], set(run_configs(record["mode"] == "quick")), b.steps // b.eval_every + 1)
    assert set(record["across_seeds"]) == set(base_labels(b)), "a configuration's summary over seeds is missing"
    assert set(record["ema_minus_hard"]) == {f"{eta:g}" for eta in b.hard_etas}, "a matched pair is missing"
    if record["front"] is not None:
        for label, summary in record["summary"].items():
            assert summary["final_front_gap"] >= -1e-3, f"{label} is above the exact front by {-summary['final_front_gap']}"


if __name__ == "__main__":
    common.main(NAME, run)
