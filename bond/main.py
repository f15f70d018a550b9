"""Launch an online alignment run from an ml-collections config.

    python -m bond.main                                  # J-BOND on the toy language, into runs/<name>
    python -m bond.main --workdir=DIR                    # the same into DIR (resumes if DIR has a checkpoint)
    python -m bond.main --config=configs/wind.py --workdir=DIR --config.algo.wind_eta=0.5
    python -m bond.main --config=configs/bond.py:quick   # a config's quick variant
    python -m bond.main --imports=my_losses --config.algorithm=my_loss   # a loss registered in my_losses.py

A config file defines `get_config(arg)`; `--config.<field>=<value>` overrides any field. The run
pretrains (or loads) the reference, trains, evaluates against the reference, writes
metrics.jsonl, TensorBoard events, checkpoints, summary.json and plots under the workdir, and
prints the before → after summary. A config error exits with status 2 and one message.
"""

from __future__ import annotations

import datetime
import importlib
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from bond.validation import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "j_bond.py"

config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "Experiment config file (get_config).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder; default: a fresh folder under runs/.")
flags.DEFINE_list("imports", [], "Modules to import first, e.g. ones that register algorithms (comma-separated).")


def default_workdir(algorithm: str) -> Path:
    """A fresh run folder runs/<algorithm>-<date>-<time>."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{algorithm}-{stamp}"


def format_summary(summary: dict) -> str:
    """The before → after table of the evaluation metrics."""
    before, after = summary.get("before", {}), summary.get("after", {})
    lines = [f"{summary['algorithm']} on {summary['task']}, {summary['steps']} steps: evaluation before → after"]
    first = ["eval/reward", "eval/kl_policy_ref", "eval/win_rate_vs_ref", "eval/log_quantile", "eval/proxy_reward"]
    for key in [k for k in first if k in after] + sorted(k for k in after if k not in first):
        name = key.removeprefix("eval/")
        lines.append(f"  {name:<22} {before.get(key, float('nan')):>10.4f} → {after[key]:>10.4f}")
    return "\n".join(lines)


def main(argv) -> None:
    """Runs the config given by the flags into the workdir and prints the summary."""
    del argv
    from bond import train  # imported here so that --help stays fast

    for module in flags.FLAGS.imports:
        importlib.import_module(module)
    config = flags.FLAGS.config
    workdir = Path(flags.FLAGS.workdir) if flags.FLAGS.workdir else default_workdir(config.algorithm)
    try:
        summary = train.run(config, workdir)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    if "after" in summary:
        print(format_summary(summary))
        print(f"Results in {workdir}: metrics.jsonl, summary.json, plots/, checkpoints/")


if __name__ == "__main__":
    app.run(main)
