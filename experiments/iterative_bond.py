"""Iterative BOND against BOND (BOND §5, Fig. 4; Sessa et al. 2024, arXiv 2407.14622).

    python -m experiments.iterative_bond --out /tmp/bond/results            # full budget
    python -m experiments.iterative_bond --quick --out /tmp/experiments     # smoke budget

Iterative BOND distills Best-of-n of an anchor and copies the policy into the anchor every
`period` steps (configs/iterative_bond.py, hard anchor). After M anchor moves the target is, if
every round's distillation were exact, Best-of-n^M of π_ref: the reward CDF goes F → F^n → F^{n^2}
→ ... (bond.tabular.iterated_bon_probs). This experiment trains iterative BOND with n ∈ {2, 4}
against BOND (configs/bond.py, fixed reference) with N ∈ {4, 8, 16} on the toy language and
reports, from the exact evaluation:

* reward and KL(π‖π_ref) during training, and the reward/KL plane with exact Best-of-N of π_ref;
* after M anchor moves (step M·period), the exact KL(π‖π_BoN(n^M)) of the iterative runs, next to
  the distance KL(π_ref‖π_BoN(n^M)) they started from;
* the tabular check: M rounds of exact Best-of-n equal Best-of-n^M (max abs difference, float64),
  on random supports with ties and on the toy language's own π_ref over its 37,449 responses.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import ml_collections
import numpy as np
from jax.typing import ArrayLike

from bond import bon, tabular
from bond.evaluation import exact_reference
from experiments import common

NAME = "iterative_bond"
SEED = 0
# Below this the float64 composition check passes; float64 rounding of a few exp/log per round is ~1e-16.
TABULAR_TOLERANCE = 1e-12


@dataclasses.dataclass(frozen=True)
class Budget:
    """What one mode trains: step counts, the anchor period, and which n and N."""

    steps: int
    period: int  # iterative BOND's anchor copy period (steps per round)
    eval_every: int
    iterative_ns: tuple[int, ...]
    bond_ns: tuple[int, ...]

    @property
    def rounds(self) -> int:
        """M: anchor moves completed by the end of training."""
        return self.steps // self.period


FULL = Budget(steps=300, period=50, eval_every=25, iterative_ns=(2, 4), bond_ns=(4, 8, 16))
# Quick: one program per algorithm family (each shape-changing n is its own compile).
QUICK = Budget(steps=12, period=4, eval_every=4, iterative_ns=(2,), bond_ns=(4,))  # evaluated at every anchor move


def budget(quick: bool) -> Budget:
    """The quick or the full budget."""
    return QUICK if quick else FULL


def eval_bon_ns(b: Budget) -> tuple[int, ...]:
    """Every N the exact evaluation measures KL to: 2..16, BOND's N and each round's target n^M."""
    targets = {n**m for n in b.iterative_ns for m in range(1, b.rounds + 1)}
    return tuple(sorted({2, 4, 8, 16} | set(b.bond_ns) | targets))


def run_configs(quick: bool) -> dict[str, ml_collections.ConfigDict]:
    """label → config: iterative BOND for each n, BOND for each N, on one shared budget."""
    b = budget(quick)
    shared = {
        **common.run_overrides(b.steps, b.eval_every, checkpoint_every=b.steps if quick else b.period, seed=SEED),
        "eval.bon_ns": eval_bon_ns(b),
    }
    configs = {}
    for n in b.iterative_ns:
        configs[f"iterative_n{n}"] = common.config(
            "iterative_bond.py", quick, **shared, **{"algo.n": float(n), "anchor.period": b.period}
        )
    for n in b.bond_ns:
        configs[f"bond_N{n}"] = common.config("bond.py", quick, **shared, **{"algo.n": float(n)})
    return configs


# ---------------------------------------------------------------------------------------------
# The tabular check: M rounds of Best-of-n are Best-of-n^M


def composition_errors(ref_probs: ArrayLike, rewards: ArrayLike, n: int, rounds: int) -> list[float]:
    """max_y |Bo_n^{∘M}(π_ref)(y) − Bo_{n^M}(π_ref)(y)| for M = 1..rounds, in float64 (BOND §5:
    the reward CDF goes F → F^n → ... → F^{n^M}).

    ref_probs, rewards: [..., K] (the support on the last axis); ties are allowed (uniform
    tie-break). The iteration applies `tabular.iterated_bon_probs` one round at a time, so every M
    reuses one compiled program per support shape (n is traced).
    """
    errors = []
    with jax.enable_x64(True):
        probs = jnp.asarray(ref_probs, jnp.float64)
        r = jnp.asarray(rewards, jnp.float64)
        n = jnp.float64(n)
        iterated = probs
        for m in range(1, rounds + 1):
            iterated = _one_round(iterated, r, n)
            errors.append(float(jnp.max(jnp.abs(iterated - _bon_probs(probs, r, n**m)))))
    return errors


_one_round = jax.jit(lambda probs, r, n: tabular.iterated_bon_probs(probs, r, n, rounds=1))
_bon_probs = jax.jit(bon.bon_probs)


def random_supports(seed: int, contexts: int = 8, support: int = 50, levels: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Dirichlet(1) policies over `support` points with integer rewards in [0, levels): many ties."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(support), size=contexts)
    rewards = rng.integers(0, levels, size=(contexts, support)).astype(np.float64)
    return probs, rewards


def reference_tables(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """(π_ref [B, M] in float64, r [B, M]) over the toy language's whole response space, for the
    eval prompts the runs of `config` are evaluated on (the exact evaluator's tables)."""
    return exact_reference(config, log=lambda _: None)


def tabular_check(
    supports: Mapping[str, tuple[np.ndarray, np.ndarray]], ns: Sequence[int], rounds: int
) -> dict[str, dict[str, list[float]]]:
    """{support name: {"n2": [error after M = 1..rounds]}} of `composition_errors`."""
    return {name: {f"n{n}": composition_errors(p, r, n, rounds) for n in ns} for name, (p, r) in supports.items()}


# ---------------------------------------------------------------------------------------------
# Reading the runs


def curves(history: Sequence[dict]) -> dict[str, list[float]]:
    """steps, exact reward and KL(π‖π_ref) of one run's evaluations."""
    steps, reward = common.series(history, "eval/reward")
    _, kl = common.series(history, "eval/kl_policy_ref")
    return {"steps": steps.tolist(), "reward": reward.tolist(), "kl_policy_ref": kl.tolist()}


def at_step(history: Sequence[dict], step: int, key: str) -> float:
    """The metric at the evaluation of `step` (which must exist)."""
    rows = [r for r in history if r["step"] == step and key in r]
    if not rows:
        raise KeyError(f"no evaluation of {key!r} at step {step}")
    return float(rows[-1][key])


def bon_points(history: Sequence[dict], ns: Sequence[int]) -> dict[str, dict[str, float]]:
    """Exact Best-of-N of π_ref on the reward/KL plane, from the step-0 evaluation (π = π_ref there,
    so kl_bon{N}_policy is KL(π_BoN‖π_ref))."""
    return {
        str(n): {"reward": at_step(history, 0, f"eval/bon{n}_reward"), "kl_ref": at_step(history, 0, f"eval/kl_bon{n}_policy")}
        for n in ns
    }


def round_targets(history: Sequence[dict], n: int, b: Budget) -> list[dict[str, float]]:
    """After M anchor moves (step M·period): the exact KL(π‖π_BoN(n^M)), the distance
    KL(π_ref‖π_BoN(n^M)) the run started from, and the rewards of π and of π_BoN(n^M)."""
    rows = []
    for m in range(1, b.rounds + 1):
        target, step = n**m, m * b.period
        rows.append(
            {
                "round": m,
                "step": step,
                "target_n": target,
                "kl_policy_bon": at_step(history, step, f"eval/kl_policy_bon{target}"),
                "kl_ref_bon": at_step(history, 0, f"eval/kl_policy_bon{target}"),
                "reward": at_step(history, step, "eval/reward"),
                "bon_reward": at_step(history, 0, f"eval/bon{target}_reward"),
            }
        )
    return rows


def bond_at_target(history: Sequence[dict], n: int, step: int) -> dict[str, float]:
    """A BOND run's exact KL(π‖π_BoN(N)) at `step` and at its end: what one-shot distillation reaches."""
    return {
        "step": step,
        "kl_policy_bon_at_step": at_step(history, step, f"eval/kl_policy_bon{n}"),
        "kl_policy_bon_final": common.final(history, f"eval/kl_policy_bon{n}"),
    }


# ---------------------------------------------------------------------------------------------
# The experiment


def run(out: Path, quick: bool) -> dict:
    b = budget(quick)
    configs = run_configs(quick)
    histories = common.train_runs(configs, Path(out) / "runs" / NAME)

    first = next(iter(histories.values()))
    results: dict[str, Any] = {
        "seeds": [SEED],
        "budget": dataclasses.asdict(b) | {"rounds": b.rounds, "eval_bon_ns": list(eval_bon_ns(b))},
        "runs": {label: curves(h) for label, h in histories.items()},
        "bon_points": bon_points(first, eval_bon_ns(b)),
        "rounds": {f"iterative_n{n}": round_targets(histories[f"iterative_n{n}"], n, b) for n in b.iterative_ns},
    }
    # The BOND run whose fixed target equals an iterative round's target, compared at the same step.
    results["bond_same_target"] = {
        f"iterative_n{row_n}_round{row['round']}": {"target_n": row["target_n"], "iterative_kl": row["kl_policy_bon"]}
        | bond_at_target(histories[f"bond_N{row['target_n']}"], row["target_n"], row["step"])
        for row_n in b.iterative_ns
        for row in results["rounds"][f"iterative_n{row_n}"]
        if row["target_n"] in b.bond_ns
    }
    ns = sorted(set(b.iterative_ns) | {2, 4})
    supports = {"random_ties": random_supports(SEED)}
    if not quick:  # the toy π_ref's tables cost a model load and an exact-evaluation compile
        supports["toy_reference"] = reference_tables(next(iter(configs.values())))
    errors = tabular_check(supports, ns, b.rounds)
    results["tabular"] = {"errors": errors, "max_abs_diff": max(max(v) for d in errors.values() for v in d.values())}
    plot(results, out)
    return results


def plot(results: Mapping[str, Any], out: Path) -> Path:
    """Reward and KL(π‖π_ref) against step, the reward/KL plane, and each round's KL to π_BoN(n^M)."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    colors = {label: f"C{i}" for i, label in enumerate(results["runs"])}
    for label, run_ in results["runs"].items():
        style = "-" if label.startswith("iterative") else "--"
        axes[0, 0].plot(run_["steps"], run_["reward"], style, color=colors[label], label=label, marker=".")
        axes[0, 1].plot(run_["steps"], run_["kl_policy_ref"], style, color=colors[label], label=label, marker=".")
        axes[1, 0].plot(run_["kl_policy_ref"], run_["reward"], style, color=colors[label], label=label, marker=".")
    points = results["bon_points"]
    ns = sorted(points, key=int)
    axes[1, 0].plot([points[n]["kl_ref"] for n in ns], [points[n]["reward"] for n in ns], "k:", marker="*",
                    label="exact BoN(N) of π_ref")
    for n in ns:
        axes[1, 0].annotate(f"N={n}", (points[n]["kl_ref"], points[n]["reward"]), fontsize=7, xytext=(3, -9),
                            textcoords="offset points")
    axes[0, 0].set(xlabel="step", ylabel="exact reward", title="reward")
    axes[0, 1].set(xlabel="step", ylabel="exact KL(π‖π_ref)", title="KL to the reference")
    axes[1, 0].set(xlabel="exact KL(π‖π_ref)", ylabel="exact reward", title="reward/KL plane")
    ax = axes[1, 1]
    for label, rows in results["rounds"].items():
        m = [r["round"] for r in rows]
        ax.semilogy(m, [r["kl_policy_bon"] for r in rows], "-o", color=colors[label], label=f"{label}: KL(π‖π_BoN(n^M))")
        ax.semilogy(m, [r["kl_ref_bon"] for r in rows], ":x", color=colors[label], label=f"{label}: KL(π_ref‖π_BoN(n^M))")
    for key, row in results["bond_same_target"].items():
        label = f"bond_N{row['target_n']}"
        m = int(key.rsplit("round", 1)[1])
        ax.semilogy([m], [row["kl_policy_bon_at_step"]], "s", color=colors[label], mfc="none")
    ax.set(xlabel="anchor moves M (step M·period)", ylabel="exact KL (nats)",
           title="distance to Best-of-n^M after M anchor moves\n(□: BOND with N = n^M at the same step)")
    ax.text(0.98, 0.02, f"tabular: max |Bo_n applied M times − Bo_(n^M)| = {results['tabular']['max_abs_diff']:.1e}",
            transform=ax.transAxes, ha="right", va="bottom", fontsize=7)
    ax.legend(fontsize=7)
    for a in axes.flat[:3]:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return common.save_figure(fig, out, NAME)


def check(record: Mapping[str, Any]) -> None:
    """Invariants of any mode's record: keys, finite values, curve lengths, KL >= 0, the exact composition."""
    b = QUICK if record["mode"] == "quick" else FULL
    common.check_run_curves(record["runs"], set(run_configs(record["mode"] == "quick")), b.steps // b.eval_every + 1)
    for n, point in record["bon_points"].items():
        bound = math.log(int(n)) - (int(n) - 1) / int(n)
        assert -1e-4 <= point["kl_ref"] <= bound + 1e-3, f"KL(π_BoN({n})‖π_ref)={point['kl_ref']} outside [0, {bound}]"
    for label, rows in record["rounds"].items():
        assert len(rows) == b.rounds, f"{label} has {len(rows)} rounds, expected {b.rounds}"
        for row in rows:
            assert row["kl_policy_bon"] >= -1e-4 and row["kl_ref_bon"] >= -1e-4, f"{label} round {row['round']}: KL < 0"
    assert record["tabular"]["max_abs_diff"] < TABULAR_TOLERANCE, (
        f"iterated Best-of-n differs from Best-of-n^M by {record['tabular']['max_abs_diff']}"
    )


if __name__ == "__main__":
    common.main(NAME, run)
