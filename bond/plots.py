"""Figures of a run folder, drawn from its metrics.jsonl (matplotlib, no display needed).

`plot_run(workdir)` writes plots/training.png (train and eval curves against step) and
plots/reward_vs_kl.png (the evaluation's reward against KL(π‖π_ref), the trade-off every paper
of this family reports). On enumerable tasks the run also leaves reference_front.json
(`write_reference_front`): the exact Best-of-N points of π_ref and the KL-regularized front
π_β ∝ π_ref·exp(r/β) (bond.exact.reference_front), which reward_vs_kl.png draws behind the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bond.metrics import read_metrics  # noqa: E402

CURVES = (
    ("train/policy_reward", "reward of policy samples"),
    ("eval/reward", "eval reward"),
    ("eval/kl_policy_ref", "eval KL(π‖π_ref)"),
    ("eval/win_rate_vs_ref", "eval win rate vs π_ref"),
    ("train/loss", "loss"),
)

REFERENCE_FRONT_FILENAME = "reference_front.json"


def write_reference_front(workdir: str | Path, points: Optional[dict[str, Any]]) -> Optional[Path]:
    """Writes `points` (bond.exact.reference_front: {"bon": ..., "front": ...}) to
    workdir/reference_front.json; does nothing when `points` is None (a sampled evaluation)."""
    if points is None:
        return None
    path = Path(workdir) / REFERENCE_FRONT_FILENAME
    path.write_text(json.dumps(points, indent=1))
    return path


def read_reference_front(workdir: str | Path) -> Optional[dict[str, Any]]:
    """The points `write_reference_front` wrote into workdir, or None if it wrote none."""
    path = Path(workdir) / REFERENCE_FRONT_FILENAME
    return json.loads(path.read_text()) if path.exists() else None


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(workdir: str | Path) -> list[Path]:
    """Draws the run's figures into workdir/plots; returns their paths."""
    workdir = Path(workdir)
    rows = read_metrics(workdir / "metrics.jsonl")
    out = workdir / "plots"
    out.mkdir(exist_ok=True)
    present = [(k, label) for k, label in CURVES if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], present):
        steps, values = _series(rows, key)
        ax.plot(steps, values, marker="." if key.startswith("eval/") else None)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths = [out / "training.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    fig = reward_vs_kl_figure(rows, read_reference_front(workdir))
    if fig is not None:
        paths.append(out / "reward_vs_kl.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def reward_vs_kl_figure(rows: list[dict], reference: Optional[dict[str, Any]] = None) -> Optional[plt.Figure]:
    """The run's evaluations on the reward/KL(π‖π_ref) plane (labels: step), over the reference's
    exact Best-of-N points (labels: N) and KL-regularized front when `reference` is given; None
    when the metrics have no evaluation with both."""
    kl_steps, kl = _series(rows, "eval/kl_policy_ref")
    reward_steps, reward = _series(rows, "eval/reward")
    if not kl or kl_steps != reward_steps:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.8))
    ax.plot(kl, reward, marker="o", label="this run")
    for s, x, y in zip(kl_steps, kl, reward):
        ax.annotate(str(s), (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    if reference is not None:
        _draw_reference(ax, reference, max(kl))
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel("KL(π‖π_ref)")
    ax.set_ylabel("reward")
    ax.set_title("reward against KL (labels: step; N of best-of-N)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _draw_reference(ax: plt.Axes, reference: dict[str, Any], run_max_kl: float) -> None:
    """π_ref's Best-of-N points and KL-regularized front (sorted by KL), the front cut a little
    past the larger of the run's and the Best-of-N points' KL (it runs on to the greedy policy's)."""
    bon, front = reference["bon"], reference["front"]
    limit = 1.15 * max([run_max_kl, *bon["kl"]]) or 1.0
    xs = [x for x in front["kl"] if x <= limit]
    ys = front["reward"][: len(xs)]
    if len(xs) < len(front["kl"]):  # the line reaches the edge, interpolated there
        xs, ys = [*xs, limit], [*ys, float(np.interp(limit, front["kl"], front["reward"]))]
    ax.plot(xs, ys, "k-", lw=1, label="KL-regularized front π_ref·exp(r/β)")
    ax.plot(bon["kl"], bon["reward"], "s", color="0.4", ms=4, label="best-of-N of π_ref")
    for n, x, y in zip(bon["n"], bon["kl"], bon["reward"]):
        ax.annotate(f"N={n}", (x, y), fontsize=7, color="0.3", textcoords="offset points", xytext=(3, -9))
    ax.set_xlim(-0.03 * limit, limit)
