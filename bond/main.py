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
prints the before → after summary. Compiled programs are cached under the config's cache_dir
(`xla/`), so a resumed run skips its compiles.

Logging. The run prints its own progress lines and summary; the libraries' logging (absl, orbax,
jax, tensorflow_datasets) stays at WARNING. absl's `--verbosity` (`-v`) brings it back:
`--verbosity=0` shows their INFO lines (orbax alone writes about fifteen per checkpoint),
`--verbosity=1` their DEBUG lines.

Every mistake a user can make on the command line ends the process with one line on stderr and
exit status 2, before anything compiles: a missing or unreadable config file, an unknown variant
after `:`, an override of a field the config does not have (the closest fields are named), a
value of the wrong type or a missing value, a config value out of its range (bond/validation.py),
a module in --imports that cannot be imported, a workdir that cannot be written. A checkpoint that
cannot be written, or a workdir none of whose checkpoints can be read, ends it with one line and
status 1 (see bond/checkpoint.py).
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import importlib
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from bond.checkpoint import CheckpointError
from bond.config_base import load_config
from bond.metrics import quiet_library_logging
from bond.validation import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "j_bond.py"

flags.DEFINE_string("workdir", None, "Run folder; default: a fresh folder under runs/.")
flags.DEFINE_list("imports", [], "Modules to import first, e.g. ones that register algorithms (comma-separated).")
flags.DEFINE_bool("distributed", False, "Join a multi-host run with jax.distributed.initialize first.")
flags.DEFINE_string("coordinator", None, "host:port of process 0 (--distributed); default: detected.")
flags.DEFINE_integer("num_processes", None, "Number of processes (--distributed); default: detected.")
flags.DEFINE_integer("process_id", None, "This process's index (--distributed); default: detected.")
flags.DEFINE_bool(
    "dry_run", False, "Compile the train step and the sampler ahead of time from shapes alone (no weights, prompts "
    "or workdir) and print one JSON line per program: per-chip memory, whether it fits, FLOPs (bond/dry_run.py). "
    "Exit status 1 when a program does not fit.")
flags.DEFINE_string(
    "topology", None, "--dry_run: compile for this TPU topology instead of the local devices, e.g. v5e:2x4 (a v5e-8) "
    "or v5p:2x2x1 (a v5p-8); needs libtpu (pip install -e \".[tpu]\"), not a TPU.")
flags.DEFINE_integer(
    "heartbeat_timeout_s", 100, lower_bound=1, help=
    "--distributed: when a process stops (killed, crashed, its host lost), the others stop after this many "
    "seconds (JAX's coordination service aborts them, 'another task died'); rerun every process to resume.",
)


# ---------------------------------------------------------------------------------------------
# The command line: every mistake becomes one UsageError naming the flag or field and the fix


class UsageError(ValueError):
    """A mistake on the command line; the message names the flag or config field and the fix."""


def config_spec(argv: Sequence[str]) -> str:
    """The value of --config in `argv` (`path[:variants]`; the last one wins), else the default config."""
    spec = str(DEFAULT_CONFIG)
    for i, arg in enumerate(argv):
        if re.match(r"^--?config=", arg):
            spec = arg.split("=", 1)[1]
        elif re.match(r"^--?config$", arg) and i + 1 < len(argv):
            spec = argv[i + 1]
    return spec


def override_names(argv: Sequence[str]) -> list[str]:
    """The fields `argv` overrides: 'algo.beta' for --config.algo.beta=0.3 (and --noconfig.plots)."""
    names = []
    for arg in argv:
        if arg == "--":
            break
        match = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
        if match:
            names.append(match.group(1))
    return names


def read_config(spec: str) -> ml_collections.ConfigDict:
    """The config of `spec` (path[:variants]); UsageError if the file is missing, unreadable or fails to load."""
    path = spec.partition(":")[0]
    file = Path(path)
    if not file.is_file():
        known = ", ".join(sorted(p.name for p in DEFAULT_CONFIG.parent.glob("*.py")))
        raise UsageError(f"--config={spec}: there is no config file {path!r}; the configs in {DEFAULT_CONFIG.parent} are {known}.")
    try:
        file.read_bytes()
    except OSError as e:
        raise UsageError(f"--config={spec}: {path!r} cannot be read ({e.strerror or e}).") from None
    try:
        return load_config(spec)
    except ValueError as e:  # config_base.apply_args: an unknown variant, naming the known ones
        raise UsageError(f"--config={spec}: {e}") from None
    except Exception as e:  # the config file itself fails: a syntax error, a missing get_config, ...
        raise UsageError(f"--config={spec}: loading {path} failed: {type(e).__name__}: {e}") from None


def _field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every field of `config`, nested ones as 'algo.beta' (the sub-configs themselves too)."""
    paths = []
    for key, value in config.items():
        paths.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            paths += _field_paths(value, f"{prefix}{key}.")
    return paths


def check_field(config: ml_collections.ConfigDict, name: str, spec: str) -> None:
    """UsageError unless `name` ('algo.beta') is a field of `config`; it names the closest fields."""
    node, walked = config, []
    for part in name.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            raise UsageError(
                f"--config.{name}: config.{'.'.join(walked)} is a {type(node).__name__}, not a group of fields; "
                f"override it as --config.{'.'.join(walked)}=VALUE."
            )
        if part not in node:
            fields = _field_paths(config)
            close = difflib.get_close_matches(name, fields, n=3, cutoff=0.6)
            if not close:  # the right name in the wrong group: match the last part alone
                leaves = difflib.get_close_matches(part, [f.rsplit(".", 1)[-1] for f in fields], n=3, cutoff=0.6)
                close = [f for leaf in leaves for f in fields if f.rsplit(".", 1)[-1] == leaf][:3]
            hint = f"did you mean {' or '.join('--config.' + f for f in close)}?" if close else (
                f"config{'.' if walked else ''}{'.'.join(walked)} has the fields {sorted(node.keys())}."
            )
            raise UsageError(f"--config.{name}: {spec} has no field config.{name}; {hint}")
        node, walked = node[part], walked + [part]


def _field_value(config: ml_collections.ConfigDict, name: str):
    node = config
    for part in name.split("."):
        node = node[part]
    return node


def _flag_error(error: flags.Error, config: ml_collections.ConfigDict, spec: str) -> str:
    """absl's message for a flag it could not parse, with the field's type and current value."""
    text = str(error)
    if type(error).__name__ == "FlagOrderError":  # config_flags: an override before --config
        return f"{text}; put --config=... before the --config.<field> overrides."
    match = re.match(r"^flag --(?:no)?config\.([\w.]+)=(.*?): (.*)$", text, re.S)
    if match:
        name, value, why = match.groups()
        return f"--config.{name}={value}: {why.splitlines()[0]}; {_takes(config, name, spec)}"
    match = re.match(r"^Missing value for flag --(?:no)?config\.([\w.]+)", text)
    if match:
        name = match.group(1)
        return f"--config.{name} has no value; write --config.{name}=VALUE: {_takes(config, name, spec)}"
    return text


def _takes(config: ml_collections.ConfigDict, name: str, spec: str) -> str:
    """What config field `name` accepts, said with its current value."""
    current = _field_value(config, name)
    if isinstance(current, ml_collections.ConfigDict):
        first = sorted(current.keys())[0]
        return f"config.{name} is a group of fields: override one of them, e.g. --config.{name}.{first}=VALUE."
    kind = type(current).__name__
    article = "an" if kind[0] in "aeiou" else "a"
    return f"config.{name} takes {article} {kind} (it is {current!r} in {spec})."


def _define_config_flag() -> None:
    """Defines --config (once). Defined when the command line is parsed, not at import: config_flags
    loads the default config, overrides applied, as soon as the flag is defined without a --config
    in sys.argv, and an error there would escape as a traceback."""
    if "config" not in flags.FLAGS:
        config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "Experiment config file (get_config).", lock_config=True)


@contextlib.contextmanager
def _sys_argv(argv: Sequence[str]) -> Iterator[None]:
    """config_flags reads sys.argv to find the overrides it defines flags for: point it at `argv`."""
    saved = sys.argv
    sys.argv = list(argv)
    try:
        yield
    finally:
        sys.argv = saved


def parse_command_line(argv: Sequence[str]) -> list[str]:
    """Parses `argv` (argv[0] is the program) into absl's FLAGS; returns the arguments left over.

    May be called again in the same process (the overrides a previous call defined are dropped).

    Raises:
      UsageError: a missing or unreadable config file, an unknown variant, an unknown field (the
        closest ones named), a value of the wrong type or syntax, an unknown flag.
    """
    argv = list(argv)
    spec = config_spec(argv[1:])
    config = read_config(spec)
    for name in override_names(argv[1:]):
        check_field(config, name, spec)
    if not any(re.match(r"^--?config(=|$)", arg) for arg in argv[1:]):
        argv.insert(1, f"--config={spec}")  # so that config_flags applies the overrides to the default config
    f = flags.FLAGS
    for name in [name for name in f if name.startswith("config.")]:
        delattr(f, name)
    f.unparse_flags()
    try:
        with _sys_argv(argv):
            _define_config_flag()
            return f(argv)
    except flags.Error as e:
        raise UsageError(_flag_error(e, config, spec)) from None
    except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:  # config_flags' own errors
        raise UsageError(f"{type(e).__name__}: {e}") from None


def exit_on_error(error: Exception) -> None:
    """Prints `error` as one line on stderr and exits: status 2 for a usage or config error, else 1."""
    prefix = {UsageError: "command line error", ConfigError: "config error", CheckpointError: "checkpoint error"}
    kind = next(name for cls, name in prefix.items() if isinstance(error, cls))
    print(f"{kind}: {error}", file=sys.stderr)
    sys.exit(1 if isinstance(error, CheckpointError) else 2)


def _parse_or_exit(argv: list[str]) -> list[str]:
    """absl's flags_parser: parse_command_line, or one line and exit status 2."""
    try:
        return parse_command_line(argv)
    except UsageError as e:
        exit_on_error(e)


def check_workdir(workdir: Path) -> None:
    """Creates `workdir` and checks that a file can be written in it; UsageError naming it otherwise."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise UsageError(
            f"--workdir={workdir} cannot be written ({e.strerror or e}); choose a folder you can write to."
        ) from None


# ---------------------------------------------------------------------------------------------
# The run


def join_cluster(coordinator: str | None, num_processes: int | None, process_id: int | None,
                 heartbeat_timeout_s: int = 100) -> None:
    """jax.distributed.initialize with the values given (None: detected from the environment).

    If a process dies, a survivor stops in one of two ways, both bounded: a collective it is in
    fails at once when the dead process's connection closes (`exit_if_a_process_died` then ends
    it with one line), or, when it waits in a coordination-service barrier (orbax's checkpoint
    commit, say), the service stops hearing the dead process's heartbeats and after
    `heartbeat_timeout_s` terminates it with JAX's fatal error "... another task died". The
    checkpoints they wrote together stay valid: rerunning every process resumes from the newest one."""
    import jax

    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
    )


# A collective that fails because another process is gone (gloo's TCP pairs, the coordination service).
PROCESS_LOST = re.compile(r"closed by peer|reset by peer|heartbeat|another task|UNAVAILABLE", re.IGNORECASE)


def exit_if_a_process_died(error: BaseException) -> None:
    """Ends a multi-process run's process with one line (status 1) when `error` says another process is gone.

    It exits at once (os._exit) rather than through jax.distributed's shutdown barrier, which
    would wait for the dead process until the heartbeat timeout and then abort with a crash
    report. Any other error returns, for the caller to raise."""
    import os

    import jax

    if jax.process_count() > 1 and isinstance(error, jax.errors.JaxRuntimeError) and PROCESS_LOST.search(str(error)):
        first = str(error).strip().splitlines()[0][:300]
        print(
            f"distributed error: process {jax.process_index()} lost another process of this run ({first}). "
            "Rerun every process with the same command to resume from the last checkpoint.",
            file=sys.stderr, flush=True,
        )
        sys.stdout.flush()
        os._exit(1)


def default_workdir(algorithm: str) -> Path:
    """A fresh run folder runs/<algorithm>-<date>-<time>."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{algorithm}-{stamp}"


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
    f = flags.FLAGS
    if f.distributed:
        join_cluster(f.coordinator, f.num_processes, f.process_id, f.heartbeat_timeout_s)
    from bond import train  # imported here so that --help stays fast

    config = flags.FLAGS.config
    if f.topology and not f.dry_run:
        exit_on_error(UsageError("--topology names hardware to compile for without running: add --dry_run."))
    if f.dry_run:
        from bond import dry_run

        try:
            target = dry_run.target_devices(f.topology)
        except (ValueError, RuntimeError) as e:
            exit_on_error(UsageError(str(e)))
        try:
            status = dry_run.main(config, f.topology, target)
        except ConfigError as e:
            exit_on_error(e)
        sys.exit(status)
    workdir = Path(flags.FLAGS.workdir) if flags.FLAGS.workdir else default_workdir(config.algorithm)
    try:
        for module in flags.FLAGS.imports:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise UsageError(f"--imports={module}: {e}; the module must be importable from {Path.cwd()}.") from None
        check_workdir(workdir)
        use_compilation_cache(config.cache_dir)
        summary = train.run(config, workdir)
    except (UsageError, ConfigError, CheckpointError) as e:
        exit_on_error(e)
    except Exception as e:
        exit_if_a_process_died(e)
        raise
    if "after" in summary:
        print(format_summary(summary))
        print(f"Results in {workdir}: metrics.jsonl, summary.json, plots/, checkpoints/")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_or_exit)
