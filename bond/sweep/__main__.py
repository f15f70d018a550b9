"""The command line: `python -m bond.sweep --config=<sweep file>[:arg] --workdir=DIR` (see bond/sweep/__init__.py)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from bond.sweep.running import run_sweep
from bond.sweep.spec import plan_sweep


def main(argv: Sequence[str]) -> None:
    from absl import flags

    from bond.metrics import quiet_library_logging
    from bond.validation import ConfigError

    del argv
    quiet_library_logging()  # as bond.main does: population mode runs in this process
    spec = flags.FLAGS.config
    spec = ml_collections.ConfigDict(spec.to_dict())  # unlocked copy
    spec.overrides = tuple(spec.overrides) + tuple(flags.FLAGS.set)
    try:
        plan_sweep(spec)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"sweep error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        rows = run_sweep(spec, flags.FLAGS.workdir, jobs=flags.FLAGS.jobs)
    except KeyboardInterrupt:
        print("sweep stopped; rerun the same command to continue where it stopped.", file=sys.stderr)
        sys.exit(130)
    workdir = Path(flags.FLAGS.workdir)
    print((workdir / "results.md").read_text())
    print(f"Results in {workdir}: results.csv, results.md, plots/, points/")
    if any(r["status"] != "finished" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Sweep file (configs/sweeps/*.py, get_config).", lock_config=False)
    flags.DEFINE_string("workdir", None, "Sweep folder: points/, results.csv, results.md, plots/.")
    flags.DEFINE_integer("jobs", None, "Points run at once in processes mode; default: the number of cores.")
    flags.DEFINE_multi_string("set", [], "A 'field=value' override of the base config, for every point (repeatable).")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
