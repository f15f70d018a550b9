"""Sweep throughput: the same points trained one after another, and as one population.

The points: configs/sweeps/j_bond_gamma_seeds.py:quick, J-BOND's γ ∈ {0, 0.5, 1, 2} × seeds {0, 1}
on the default task (the toy language) with the quick budget (40 steps, batch 16, exact
evaluation every 20 steps, checkpoints every 20).

    python benchmarks/sweep.py                 # 8 points
    python benchmarks/sweep.py --steps=20      # a shorter budget

Sequential: `train.run` of each point in this process, one after another (each compiles its own
step, as separate runs do). Population: `population.run_population` of all points (one compiled
vmapped step). Before either is timed, the reference is pretrained (or loaded from the cache) and
the exact evaluator's programs are compiled once, so neither pays for them. Both write every
point's metrics, checkpoints and summary.

Prints one JSON line: points, steps, sequential_s, population_s, speedup (sequential_s /
population_s) and max_abs_diff, the largest difference of any final evaluation metric between the
two ways (they compute the same runs; see tests/test_population.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import jax

from bond import population, sweep, train
from bond.context import build_context
from bond.evaluation import Evaluator

SWEEP = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "j_bond_gamma_seeds.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=0, help="steps per point (0: the quick config's 40)")
    parser.add_argument("--cache_dir", default="", help="reference cache ('' = $BOND_CACHE or ~/.cache/bond)")
    args = parser.parse_args()

    spec = sweep.load_sweep(f"{SWEEP}:quick")
    spec.overrides = (f"cache_dir={args.cache_dir}",) + ((f"steps={args.steps}",) if args.steps else ())
    points = sweep.expand_points(spec)
    base = sweep.base_config(spec)
    configs = [sweep.point_config(spec, p, base) for p in points]

    quiet = lambda _: None
    # Not timed: pretraining (or loading) the reference, and compiling the exact evaluator for
    # parameters placed as both ways place them.
    context = build_context(base, lambda m: print(m, file=sys.stderr))
    Evaluator(context.setup, context.local_reference, jax.random.PRNGKey(0))(context.local_reference)

    # The runs' progress lines go nowhere: the JSON line is the only output.
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        together = population.run_population(configs, [Path(tmp) / "population" / p.name for p in points], quiet)
        population_s = time.perf_counter() - start

        start = time.perf_counter()
        separate = [train.run(c, Path(tmp) / "sequential" / p.name, quiet) for c, p in zip(configs, points)]
        sequential_s = time.perf_counter() - start

    diff = max(abs(a["after"][k] - b["after"][k]) for a, b in zip(together, separate) for k in a["after"])
    print(json.dumps({
        "sweep": f"{SWEEP.name}:quick", "points": len(points), "steps": base.steps,
        "sequential_s": round(sequential_s, 2), "population_s": round(population_s, 2),
        "speedup": round(sequential_s / population_s, 2), "max_abs_diff": diff,
    }))


if __name__ == "__main__":
    main()
