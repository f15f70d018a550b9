"""Runs every experiment of experiments/README.md, in order, into one folder.

    python -m experiments.all --quick --out /tmp/experiments     # the small budget (the test suite runs it)
    python -m experiments.all --out experiments/results          # the budget the report's numbers come from
    python -m experiments.all --quick --only=wind,n_sweep        # some of them

Each experiment writes <out>/<name>.json and <out>/<name>.png (experiments/common.py); this
script adds <out>/all.json, the mode and runtime of each. Runs are resumable: rerunning after an
interruption skips the training runs that finished.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Sequence

from experiments import common

EXPERIMENTS: tuple[str, ...] = (
    "bon_theory",
    "jeffreys",
    "n_sweep",
    "quantile_estimation",
    "iterative_bond",
    "j_bond_anchors",
    "j_bond_vs_reinforce",
    "wind",
    "distribution_matching",
    "over_optimization",
    "rejection_sampling",
    "test_time",
    "lora",
)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = [a for a in argv if a.startswith("--only=")]
    args = common.parse_args([a for a in argv if a not in only], description="Every experiment of experiments/README.md")
    names = [n for a in only for n in a.removeprefix("--only=").split(",") if n] or list(EXPERIMENTS)
    unknown = sorted(set(names) - set(EXPERIMENTS))
    if unknown:
        raise SystemExit(f"--only: unknown experiments {unknown}; choose from {list(EXPERIMENTS)}")
    start = time.perf_counter()
    records = {}
    for name in names:
        module = importlib.import_module(f"experiments.{name}")
        record = common.run_experiment(module.NAME, module.run, args.out, args.quick)
        records[name] = {"mode": record["mode"], "runtime_s": record["runtime_s"]}
        print(f"{name}: {record['runtime_s']} s", flush=True)
    total = time.perf_counter() - start
    (args.out / "all.json").write_text(json.dumps({"runtime_s": round(total, 1), "experiments": records}, indent=1))
    print(f"{len(names)} experiments in {total:.0f} s -> {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
