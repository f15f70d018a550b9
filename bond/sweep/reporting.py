"""A sweep's results: the table of final metrics (results.csv, results.md), the mean over seeds,
and the plots (curves.png, final_vs_<field>.png).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from bond.sweep.spec import Point, format_value, is_finished, point_dir

# Shown in results.md next to the sweep's metric (results.csv has every final metric).
HEADLINE_METRICS = (
    "eval/reward", "eval/kl_policy_ref", "eval/win_rate_vs_ref", "eval/log_quantile", "eval/proxy_reward",
)


def point_status(run_dir: Path) -> str:
    """'finished' (summary.json), 'failed' (error.txt) or 'pending'."""
    if is_finished(run_dir):
        return "finished"
    return "failed" if (run_dir / "error.txt").is_file() else "pending"


def collect_results(spec: ml_collections.ConfigDict, points: Sequence[Point], workdir: str | Path) -> list[dict]:
    """One row per point: name, the swept values, status, steps, then every final evaluation metric
    (summary.json's "after"); metrics are absent for unfinished points."""
    rows = []
    for point in points:
        run_dir = point_dir(workdir, point)
        row = {"name": point.name, **dict(point.values), "status": point_status(run_dir)}
        if row["status"] == "finished":
            summary = json.loads((run_dir / "summary.json").read_text())
            row["steps"] = summary["steps"]
            row.update(summary["after"])
        rows.append(row)
    return rows


def _columns(spec: ml_collections.ConfigDict, points: Sequence[Point], rows: Sequence[dict]) -> list[str]:
    fields = [field for field, _ in points[0].values] if points else []
    metrics = sorted({k for row in rows for k in row if k.startswith("eval/")} - {spec.metric})
    return ["name", *fields, "status", "steps", spec.metric, *metrics]


def group_over_seeds(spec: ml_collections.ConfigDict, points: Sequence[Point], rows: Sequence[dict]) -> list[dict]:
    """The metric's mean, sample standard deviation and count over the seeds of each setting of the
    other swept fields (finished points only)."""
    fields = [field for field, _ in points[0].values if field != "seed"] if points else []
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        key = tuple(row[f] for f in fields)
        groups.setdefault(key, [])
        if spec.metric in row:
            groups[key].append(float(row[spec.metric]))
    out = []
    for key, values in groups.items():
        n = len(values)
        mean = sum(values) / n if n else math.nan
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
        out.append({**dict(zip(fields, key)), "mean": mean, "std": std, "n": n})
    return out


def _cell(value: Any, exact: bool) -> str:
    """A markdown cell: swept values exactly as in point names, metrics to 4 decimals."""
    if value is None:
        return ""
    if isinstance(value, float) and not exact:
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return format_value(value)


def _markdown_table(header: Sequence[str], body: Sequence[Sequence[Any]], exact: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(v, h in exact) for h, v in zip(header, line)) + " |" for line in body]


def write_results(
    spec: ml_collections.ConfigDict, points: Sequence[Point], rows: Sequence[dict], workdir: str | Path
) -> tuple[Path, Path]:
    """DIR/results.csv (every final metric, full precision) and DIR/results.md (the sweep's metric
    and `HEADLINE_METRICS` to 4 decimals, plus the mean over seeds when there are several)."""
    workdir = Path(workdir)
    columns = _columns(spec, points, rows)
    fields = [field for field, _ in points[0].values] if points else []
    csv_path = workdir / "results.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: format_value(v) if isinstance(v, (tuple, list)) else v for k, v in row.items()})

    finished = sum(r["status"] == "finished" for r in rows)
    lines = [f"# Sweep: {spec.metric}", "", f"base `{spec.base}`, {len(rows)} points, {finished} finished.", ""]
    shown = [c for c in columns[1:] if not c.startswith("eval/") or c == spec.metric or c in HEADLINE_METRICS]
    lines += _markdown_table(shown, [[row.get(c) for c in shown] for row in rows], exact=fields)
    if spec.seeds and len(spec.seeds) > 1:
        groups = group_over_seeds(spec, points, rows)
        others = [f for f in fields if f != "seed"]
        lines += ["", f"## {spec.metric}: mean ± standard deviation over seeds", ""]
        body = [[g[f] for f in others] + [g["mean"], g["std"], g["n"]] for g in groups]
        lines += _markdown_table([*others, "mean", "std", "seeds"], body, exact=others)
    md_path = workdir / "results.md"
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_sweep(
    spec: ml_collections.ConfigDict, points: Sequence[Point], rows: Sequence[dict], workdir: str | Path
) -> list[Path]:
    """DIR/plots/curves.png (metric against step, every point that has metrics) and, for each swept
    field other than the seed with at least two values, DIR/plots/final_vs_<field>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bond.metrics import read_metrics

    out = Path(workdir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    fields = [field for field, _ in points[0].values if field != "seed"] if points else []
    label = lambda point: ",".join(f"{f}={format_value(point.value(f))}" for f in fields) or "base"
    groups = list(dict.fromkeys(label(p) for p in points))
    colors = {g: plt.get_cmap("viridis")(i / max(len(groups) - 1, 1)) for i, g in enumerate(groups)}

    fig, ax = plt.subplots(figsize=(6, 4))
    labelled = set()
    for point in points:
        path = point_dir(workdir, point) / "metrics.jsonl"
        if not path.is_file():
            continue
        series = [(r["step"], r[spec.metric]) for r in read_metrics(path) if spec.metric in r]
        if series:
            group = label(point)
            ax.plot(*zip(*series), marker=".", color=colors[group], label=None if group in labelled else group)
            labelled.add(group)
    ax.set_xlabel("step")
    ax.set_ylabel(spec.metric)
    ax.set_title(f"{spec.metric} of every point", fontsize=10)
    ax.grid(alpha=0.3)
    if labelled:
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [out / "curves.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    for field in fields:
        values = list(dict.fromkeys(p.value(field) for p in points))
        if len(values) < 2:
            continue
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        position = (lambda v: v) if numeric else (lambda v: values.index(v))
        others = [f for f in fields if f != field]
        fig, ax = plt.subplots(figsize=(5, 3.8))
        lines: dict[tuple, dict[Any, list[float]]] = {}
        for point, row in zip(points, rows):
            if spec.metric not in row:
                continue
            key = tuple(point.value(f) for f in others)
            lines.setdefault(key, {}).setdefault(point.value(field), []).append(row[spec.metric])
        for key, by_value in lines.items():
            name = ",".join(f"{f}={format_value(v)}" for f, v in zip(others, key)) or spec.metric
            xs = [v for v in values if v in by_value]
            means = [sum(by_value[v]) / len(by_value[v]) for v in xs]
            line = ax.plot([position(v) for v in xs], means, marker="o", label=name)
            for v in xs:
                ax.scatter([position(v)] * len(by_value[v]), by_value[v], s=12, color=line[0].get_color(), alpha=0.5)
        if not numeric:
            ax.set_xticks(range(len(values)), [format_value(v) for v in values])
        ax.set_xlabel(field)
        ax.set_ylabel(f"final {spec.metric}")
        ax.set_title(f"final {spec.metric} against {field} (dots: seeds, line: mean)", fontsize=9)
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / f"final_vs_{field}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
