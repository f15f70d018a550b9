"""J-BOND against REINFORCE on the reward/KL plane (BOND §6, Fig. 7; Sessa et al. 2024, arXiv 2407.14622).

    python -m experiments.j_bond_vs_reinforce --out /tmp/bond/results            # full budget
    python -m experiments.j_bond_vs_reinforce --quick --out /tmp/experiments     # smoke budget

REINFORCE (configs/reinforce.py: return r − β_RL·(log π − log π_ref), four samples per prompt,
leave-one-out baseline; bond.losses.policy_gradient.reinforce) with β_RL ∈ {0.001, 0.01, 0.1, 1}
trains as one population; J-BOND (configs/j_bond.py: β = 0.5, EMA anchor η = 0.05, γ = 0) has
no KL weight. Each run's exact (KL(π‖π_ref), reward) trajectory is compared with

* the other algorithm's points: a point is dominated when another has at least its reward at no
  more KL (and is strictly better in one);
* the exact KL-regularized front: π_β ∝ π_ref·exp(r/β) maximizes E_π[r] − β·KL(π‖π_ref), so over β
  its (mean KL, mean reward) pairs are the highest mean reward any policy reaches at each mean KL
  on the eval prompts (full mode; computed from the toy language's enumerated π_ref). The gap
  front(KL) − reward measures how far a run is from the best trade-off at the KL it spent.

Full mode trains every configuration with seeds 0, 1 and 2 (quick: seed 0): the final numbers are
reported as mean ± standard error over the seeds, and the domination fractions per seed (J-BOND
against the REINFORCE runs of the same seed). The figure shows seed 0.

The paper's claim: J-BOND's trade-off beats every REINFORCE run without a KL weight to tune.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import ml_collections
import numpy as np
from jax.typing import ArrayLike

from bond.exact import FRONT_BETAS, kl_regularized_front
from experiments import common
from experiments.iterative_bond import curves, reference_tables

NAME = "j_bond_vs_reinforce"
KL_COEFS = (0.001, 0.01, 0.1, 1.0)


@dataclasses.dataclass(frozen=True)
class Budget:
    """What one mode trains: the step count and the evaluation interval."""

    steps: int
    eval_every: int


FULL = Budget(steps=300, eval_every=25)
QUICK = Budget(steps=common.QUICK_STEPS, eval_every=common.QUICK_STEPS)  # evaluated at its ends only


def budget(quick: bool) -> Budget:
    """The quick or the full budget."""
    return QUICK if quick else FULL


def base_labels() -> tuple[str, ...]:
    """One label per compared configuration: each REINFORCE β_RL, then J-BOND."""
    return (*(f"reinforce_kl{coef:g}" for coef in KL_COEFS), "j_bond")


def run_configs(quick: bool) -> dict[str, ml_collections.ConfigDict]:
    """label → config: REINFORCE for each β_RL and seed (one population), J-BOND for each seed (another)."""
    b = budget(quick)
    configs = {}
    for seed in common.seeds(quick):
        shared = common.run_overrides(b.steps, b.eval_every, checkpoint_every=b.steps if quick else 50, seed=seed)
        for coef in KL_COEFS:
            configs[common.seed_label(f"reinforce_kl{coef:g}", seed)] = common.config(
                "reinforce.py", quick, **shared, **{"algo.kl_coef": coef})
        configs[common.seed_label("j_bond", seed)] = common.config("j_bond.py", quick, **shared)
    return configs


# ---------------------------------------------------------------------------------------------
# The exact KL-regularized front and the comparisons


def front_gaps(front: Mapping[str, Sequence[float]], kl: ArrayLike, reward: ArrayLike) -> np.ndarray:
    """front(KL) − reward at each point: the reward left on the table at that KL (>= 0 up to
    interpolation). Beyond the front's largest KL the front is flat at its last reward."""
    return np.interp(np.asarray(kl), front["kl"], front["reward"]) - np.asarray(reward)


def dominated(points: np.ndarray, by: np.ndarray) -> np.ndarray:
    """For each (kl, reward) row of `points`: whether some row of `by` has reward >= and KL <=,
    with at least one strict."""
    kl, reward = points[:, None, 0], points[:, None, 1]
    weakly = (by[None, :, 0] <= kl) & (by[None, :, 1] >= reward)
    strictly = (by[None, :, 0] < kl) | (by[None, :, 1] > reward)
    return np.any(weakly & strictly, axis=1)


def trajectory_points(run_: Mapping[str, Sequence[float]]) -> np.ndarray:
    """[T, 2] (KL, reward) of a run's evaluations after step 0 (step 0 is π_ref for every run)."""
    return np.stack([run_["kl_policy_ref"][1:], run_["reward"][1:]], axis=1)


def domination_summary(runs: Mapping[str, Mapping[str, Sequence[float]]], group_a: Sequence[str],
                       group_b: Sequence[str]) -> dict[str, float]:
    """Fractions of a's trajectory points dominated by some point of b's, and of b's by a's."""
    a = np.concatenate([trajectory_points(runs[label]) for label in group_a])
    b = np.concatenate([trajectory_points(runs[label]) for label in group_b])
    return {"a_dominated_by_b": float(dominated(a, b).mean()), "b_dominated_by_a": float(dominated(b, a).mean())}


def run_summary(run_: Mapping[str, Sequence[float]], front: Mapping[str, Sequence[float]] | None) -> dict[str, Any]:
    """Final reward and KL, and (with a front) the final and mean gap to it after step 0."""
    summary: dict[str, Any] = {"final_reward": run_["reward"][-1], "final_kl_policy_ref": run_["kl_policy_ref"][-1]}
    if front is not None:
        gaps = front_gaps(front, run_["kl_policy_ref"], run_["reward"])
        summary.update(final_front_gap=float(gaps[-1]), mean_front_gap=float(gaps[1:].mean()))
    return summary


# ---------------------------------------------------------------------------------------------
# The experiment


def run(out: Path, quick: bool) -> dict:
    b = budget(quick)
    configs = run_configs(quick)
    histories = common.train_runs(configs, Path(out) / "runs" / NAME)
    runs = {label: curves(h) for label, h in histories.items()}
    # The toy π_ref's tables cost a model load and an exact-evaluation compile: full mode only.
    front = None if quick else kl_regularized_front(*reference_tables(configs["j_bond"]), FRONT_BETAS)
    reinforce = [label for label in base_labels() if label.startswith("reinforce")]
    summaries = {label: run_summary(r, front) for label, r in runs.items()}

    def domination(seed: int) -> dict[str, Any]:
        """J-BOND's trajectory against the REINFORCE runs of the same seed."""
        j_bond, others = common.seed_label("j_bond", seed), [common.seed_label(label, seed) for label in reinforce]
        return domination_summary(runs, [j_bond], others) | {
            f"j_bond_vs_{label}": domination_summary(runs, [j_bond], [common.seed_label(label, seed)]) for label in reinforce}

    per_seed = {str(s): domination(s) for s in common.seeds(quick)}
    results: dict[str, Any] = {
        "seeds": list(common.seeds(quick)),
        "budget": dataclasses.asdict(b),
        "kl_coefs": list(KL_COEFS),
        "samples_per_prompt": {"reinforce": configs[reinforce[0]].algo.num_samples, "j_bond": "1 policy + 2 anchor"},
        "runs": runs,
        "summary": summaries,
        "across_seeds": common.across_seeds(summaries, base_labels(), common.seeds(quick)),
        "domination_per_seed": per_seed,
        "front": front,
    }
    plot(results, out)
    return results


def plot(results: Mapping[str, Any], out: Path) -> Path:
    """Left: each run's reward/KL trajectory (final points marked) with the exact front. Right:
    the gap to the front against step (full mode) or reward against step (quick mode)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    front = results["front"]
    if front is not None:
        left.plot(front["kl"], front["reward"], "k-", lw=1, label="exact front π_ref·exp(r/β)/Z")
    for i, label in enumerate(base_labels()):  # the first seed's runs
        run_ = results["runs"][label]
        color, style = f"C{i}", "-" if label == "j_bond" else "--"
        width = 2.5 if label == "j_bond" else 1.2
        left.plot(run_["kl_policy_ref"], run_["reward"], style, color=color, lw=width, marker=".", label=label)
        left.plot(run_["kl_policy_ref"][-1], run_["reward"][-1], "o", color=color, ms=9, mfc="none")
        if front is not None:
            gaps = front_gaps(front, run_["kl_policy_ref"], run_["reward"])
            right.plot(run_["steps"], gaps, style, color=color, lw=width, marker=".", label=label)
        else:
            right.plot(run_["steps"], run_["reward"], style, color=color, lw=width, marker=".", label=label)
    max_kl = max(max(r["kl_policy_ref"]) for r in results["runs"].values())
    left.set(xlim=(-0.05 * max_kl, 1.08 * max_kl), xlabel="exact KL(π‖π_ref)", ylabel="exact reward",
             title="reward/KL trajectories (○ final point)")
    if front is not None:
        right.set(xlabel="step", ylabel="front(KL) − reward", title="reward below the exact front at the same KL")
    else:
        right.set(xlabel="step", ylabel="exact reward", title="reward")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return common.save_figure(fig, out, NAME)


def check(record: Mapping[str, Any]) -> None:
    """Invariants of any mode's record: every run present, finite, with the expected number of
    evaluations starting at π_ref; fractions in [0, 1]; no run above the exact front."""
    b = QUICK if record["mode"] == "quick" else FULL
    common.check_run_curves(record["runs"], set(run_configs(record["mode"] == "quick")), b.steps // b.eval_every + 1)
    assert set(record["domination_per_seed"]) == {str(s) for s in record["seeds"]}, "a seed's domination is missing"
    for seed, domination in record["domination_per_seed"].items():
        for key, value in domination.items():
            fractions = value.values() if isinstance(value, Mapping) else [value]
            assert all(0.0 <= f <= 1.0 for f in fractions), f"seed {seed}: domination {key}={value} outside [0, 1]"
    for base, numbers in record["across_seeds"].items():
        for key, value in numbers.items():
            assert len(value["per_seed"]) == len(record["seeds"]), f"{base}: {key} lacks seeds"
            assert abs(value["mean"] - np.mean(value["per_seed"])) < 1e-9, f"{base}: {key} mean"
    if record["front"] is not None:
        assert np.all(np.diff(record["front"]["kl"]) >= 0), "front not sorted by KL"
        for label, summary in record["summary"].items():
            # A policy above the exact KL-regularized front would contradict its optimality.
            assert summary["final_front_gap"] >= -1e-3, f"{label} is above the exact front by {-summary['final_front_gap']}"


if __name__ == "__main__":
    common.main(NAME, run)
