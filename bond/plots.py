"""Figures of a run folder, drawn from its metrics.jsonl (matplotlib, no display needed).

`plot_run(workdir)` writes plots/training.png (train and eval curves against step) and
plots/reward_vs_kl.png (the evaluation's reward against KL(π‖π_ref), the trade-off every paper
of this family reports).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bond.metrics import read_metrics  # noqa: E402

CURVES = (
    ("train/policy_reward", "reward of policy samples"),
    ("eval/reward", "eval reward"),
    ("eval/kl_policy_ref", "eval KL(π‖π_ref)"),
    ("eval/win_rate_vs_ref", "eval win rate vs π_ref"),
    ("train/loss", "loss"),
)


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

    kl_steps, kl = _series(rows, "eval/kl_policy_ref")
    reward_steps, reward = _series(rows, "eval/reward")
    if kl and kl_steps == reward_steps:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        ax.plot(kl, reward, marker="o")
        for s, x, y in zip(kl_steps, kl, reward):
            ax.annotate(str(s), (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("KL(π‖π_ref)")
        ax.set_ylabel("reward")
        ax.set_title("reward against KL (labels: step)", fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / "reward_vs_kl.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
