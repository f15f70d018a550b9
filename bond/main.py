"""Launch an online alignment run from an ml-collections config.

    python -m bond.main                                  # J-BOND on the toy language, into runs/<name>
    python -m bond.main --workdir=DIR                    # the same into DIR (resumes if DIR has a checkpoint)
    python -m bond.main --config=configs/wind.py --workdir=DIR --config.algo.wind_eta=0.5
    python -m bond.main --config=configs/bond.py:quick   # a config's quick variant
    python -m bond.main --imports=my_losses --config.algorithm=my_loss   # a loss registered in my_losses.py
    python -m bond.main --distributed --coordinator=host0:1234 --num_processes=2 --process_id=$I ...  # one per host

With `--distributed`, `jax.distributed.initialize` joins this process to the others before
anything else touches JAX (without --coordinator it detects the cluster, as on TPU pods and SLURM);
every host runs the same command with its own --process_id, and the workdir and cache_dir must be
on a file system all hosts share (process 0 writes the stage caches, metrics and summary; the
checkpoints are written collectively).

A config file defines `get_config(arg)`; `--config.<field>=<value>` overrides any field. The run
pretrains (or loads) the reference, trains, evaluates against the reference, writes
metrics.jsonl, TensorBoard events, checkpoints, summary.json and plots under the workdir, and
prints the before → after summary. A config error exits with status 2 and one message. Compiled
programs are cached under the config's cache_dir (`xla/`), so a resumed run skips its compiles.

Logging. The run prints its own progress lines and summary; the libraries' logging (absl, orbax,
jax, tensorflow_datasets) stays at WARNING. absl's `--verbosity` (`-v`) brings it back:
`--verbosity=0` shows their INFO lines (orbax alone writes about fifteen per checkpoint),
`--verbosity=1` their DEBUG lines.
"""

from __future__ import annotations

import datetime
import importlib
import sys
from pathlib import Path

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from bond.validation import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "j_bond.py"

config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "Experiment config file (get_config).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder; default: a fresh folder under runs/.")
flags.DEFINE_list("imports", [], "Modules to import first, e.g. ones that register algorithms (comma-separated).")
flags.DEFINE_bool("distributed", False, "Join a multi-host run with jax.distributed.initialize first.")
flags.DEFINE_string("coordinator", None, "host:port of process 0 (--distributed); default: detected.")
flags.DEFINE_integer("num_processes", None, "Number of processes (--distributed); default: detected.")
flags.DEFINE_integer("process_id", None, "This process's index (--distributed); default: detected.")


def join_cluster() -> None:
    """jax.distributed.initialize with the flags given (the rest detected from the environment)."""
    import jax

    f = flags.FLAGS
    jax.distributed.initialize(
        coordinator_address=f.coordinator, num_processes=f.num_processes, process_id=f.process_id
    )


def default_workdir(algorithm: str) -> Path:
    """A fresh run folder runs/<algorithm>-<date>-<time>."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{algorithm}-{stamp}"


def quiet_library_logging() -> None:
    """Library logging at WARNING unless --verbosity (-v) was given on the command line.

    absl's app.run raises an unset --verbosity to 0 (INFO) once the flags are parsed, and the
    libraries log through absl's handler on the root logger: orbax alone writes about fifteen INFO
    lines per checkpoint. The run's own output is printed, not logged, so it is unaffected.
    """
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)


# Which way each KL of the summary table goes (bond/exact.py `exact_metrics`).
KL_LEGEND = (
    "  kl_a_b = KL(a‖b), policy = π, ref = π_ref, bonN = best-of-N of π_ref: "
    "kl_policy_bonN = KL(π‖π_BoN) (backward), kl_bonN_policy = KL(π_BoN‖π) (forward)"
)


def format_summary(summary: dict) -> str:
    """The before → after table of the evaluation metrics, with a line naming the KL directions."""
    before, after = summary.get("before", {}), summary.get("after", {})
    lines = [f"{summary['algorithm']} on {summary['task']}, {summary['steps']} steps: evaluation before → after"]
    first = ["eval/reward", "eval/kl_policy_ref", "eval/win_rate_vs_ref", "eval/log_quantile", "eval/proxy_reward"]
    for key in [k for k in first if k in after] + sorted(k for k in after if k not in first):
        name = key.removeprefix("eval/")
        lines.append(f"  {name:<22} {before.get(key, float('nan')):>10.4f} → {after[key]:>10.4f}")
    if any(key.startswith("eval/kl_") for key in after):
        lines.append(KL_LEGEND)
    return "\n".join(lines)


def use_compilation_cache(cache_dir: str) -> str:
    """Turns on JAX's persistent compilation cache under the stage cache (<cache_dir>/xla), so that a
    resumed or repeated run loads its compiled programs instead of compiling them again; an existing
    $JAX_COMPILATION_CACHE_DIR wins. Returns the folder in use."""
    import os

    import jax

    from bond.stages import cache_root

    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(cache_root(cache_dir) / "xla")
    jax.config.update("jax_compilation_cache_dir", folder)
    return folder


def main(argv) -> None:
    """Runs the config given by the flags into the workdir and prints the summary."""
    del argv
    quiet_library_logging()
    if flags.FLAGS.distributed:
        join_cluster()
    from bond import train  # imported here so that --help stays fast

    for module in flags.FLAGS.imports:
        importlib.import_module(module)
    config = flags.FLAGS.config
    use_compilation_cache(config.cache_dir)
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
