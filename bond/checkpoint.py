"""Checkpoints of a training run: a thin layer over orbax's CheckpointManager that verifies what it
reads back, falls back to an older checkpoint when the newest cannot be read, and SIGTERM handling.

A checkpoint at step t holds three items:

  state   the training-state pytree (policy and anchor parameters, optimizer state, algorithm
          state, step, PRNG key, ...) saved with `ocp.args.StandardSave`: arrays of any sharding,
          typed PRNG keys (orbax stores `jax.random.key_data` and rewraps it with the key type of
          the restore target), numpy arrays and Python scalars; None subtrees stay None;
  meta    a JSON dict the caller passes (the config, ...), saved with `ocp.args.JsonSave`;
  arrays  the list of the state's arrays: each one's path, shape, dtype and a 32-bit fingerprint of
          its bytes (`fingerprints`), and a CRC of the list itself. It is what tells a damaged
          checkpoint from one saved with another config.

Who decides when to save: the caller. `save(t, ...)` writes step t whenever it is called (the
training loop saves every config.checkpoint.every steps, at its last step and on SIGTERM); the
Checkpointer has no schedule of its own. Only a step newer than the newest checkpoint is written.

What a crash can and cannot do. Orbax writes step t into `<dir>/<t>.orbax-checkpoint-tmp-<n>/`,
writes `commit_success.txt` into it and renames it to `<dir>/<t>/` only after every item is written
(on a local or POSIX file system; on object stores the commit file, written last, is the only
marker). A process killed at any moment (SIGKILL, during a save too) therefore leaves the complete
checkpoints it had plus at most one temporary directory, which `all_steps` / `restore` never see and
which the next `Checkpointer` on the directory deletes. A step folder without `commit_success.txt`
is read as an unfinished save. Old checkpoints beyond `keep` are deleted only after the new one is
complete. A save that fails (a full disk, say) raises `CheckpointSaveError` naming the step and the
newest checkpoint that is still intact. `tests/test_checkpoint.py` and `tests/test_faults.py` check this.

What damage does on restore. Bit rot and truncated files are not always caught by the storage
format: orbax's compressed array chunks carry no checksum, so a flipped byte may decode to other
numbers without any error. `restore` therefore compares every array it reads with the fingerprint
saved next to it, and raises `UnreadableCheckpoint` naming the step, the array and the cause:
damaged bytes or missing files ("damaged"), or a structure, shape or key type that differs from the
restore target ("another config"). `restore_latest` (one run) and `restore_newest_common` (a
population, one Checkpointer per member) try the newest step first and fall back to older ones;
the unreadable newer steps are then moved aside to `<dir>/<t>.unreadable` so that the resumed run
can write step t again. Only when no step can be read do they raise `NoReadableCheckpoint`, which
names the folder and the choices. Checkpoints written before the array list existed (their meta
may hold a `data_position`, which nothing reads any more) still restore, unverified.

Saving is asynchronous: `save` returns once the arrays are copied to host memory (so the caller
may donate or delete them right away) and a background thread writes them. `close` (or
`wait_until_finished`) waits for the write; call it before the process exits.

The restore target. `restore` places every array onto the sharding and dtype of an abstract
target, a pytree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` that allocates nothing:

    abstract = jax.eval_shape(init_train_state, config, key)         # shapes and dtypes only
    abstract = abstract_like(abstract, shardings)                     # + where each array lives
    state, meta = checkpointer.restore(abstract_state=abstract)

where `shardings` is a matching pytree of `jax.sharding.Sharding` (e.g. built with
`bond.sharding.param_shardings` / `shardings_like_params`). Arrays are read in the dtype they were
saved in, verified, then cast to the target's dtype. A typed PRNG key's abstract leaf keeps its key
dtype (`key<fry>`, ...), so the key comes back typed with the same implementation.
`jax.eval_shape` turns a Python int leaf into an int32 array; values that must come back as
Python numbers (a count beyond 2**31, say) belong in `meta`.

References:
  orbax-checkpoint CheckpointManager: https://orbax.readthedocs.io/en/stable/guides/checkpoint/orbax_checkpoint_api_overview.html
  atomic step directories: orbax/checkpoint/_src/path/atomicity.py (orbax-checkpoint 0.12).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import sys
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

COMMIT_MARKER = "commit_success.txt"  # orbax writes it into a step folder once every item is written
UNREADABLE_SUFFIX = ".unreadable"  # where an unreadable step folder is moved once an older one restored

# ---------------------------------------------------------------------------------------------
# Restore targets


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """The restore target of `tree`: each array leaf as a `jax.ShapeDtypeStruct` with a sharding.

    Args:
      tree: a pytree of arrays or `jax.ShapeDtypeStruct`s (e.g. the output of `jax.eval_shape`).
        Python scalars (int, float, bool) stay as they are: orbax restores them as Python scalars.
      shardings: a pytree of `jax.sharding.Sharding` with the structure of `tree`'s array leaves,
        one Sharding for all of them, or None to keep each leaf's own sharding (a concrete
        array's placement; device 0 for a ShapeDtypeStruct without one).

    Returns:
      A pytree with the structure of `tree` whose array leaves are ShapeDtypeStructs.
    """
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def leaf_target(leaf: Any, sharding: jax.sharding.Sharding | None) -> Any:
        if isinstance(leaf, (int, float, bool)):
            return leaf
        if sharding is None:
            sharding = getattr(leaf, "sharding", None) or default
        return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=sharding)

    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda leaf: leaf_target(leaf, shardings), tree)
    try:
        return jax.tree.map(leaf_target, tree, shardings)
    except ValueError as e:
        raise ValueError(
            "abstract_like: `shardings` must have the structure of `tree` (one Sharding per array "
            f"leaf), be a single Sharding, or be None. {e}"
        ) from e




# ---------------------------------------------------------------------------------------------
# Errors


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the step, the folder and what to do."""


class UnreadableCheckpoint(CheckpointError, ValueError):
    """One step's checkpoint cannot be restored onto the target.

    Attributes:
      step: the step.
      directory: the checkpoint folder.
      cause: DAMAGED (missing files, bad bytes, an unfinished save), ANOTHER_CONFIG (the arrays'
        structure or shapes differ from the target's) or UNKNOWN (a checkpoint without an array
        list, which cannot tell the two apart).
    """

    DAMAGED, ANOTHER_CONFIG, UNKNOWN = "damaged", "another config", "damaged or another config"

    def __init__(self, step: int, directory: str, cause: str, detail: str):
        self.step, self.directory, self.cause, self.detail = step, directory, cause, detail
        self.what = {
            self.DAMAGED: "is damaged",
            self.ANOTHER_CONFIG: "was saved with another config",
            self.UNKNOWN: "does not fit this run's state or is damaged (it predates the array list that tells which)",
        }[cause]
        super().__init__(f"The checkpoint at step {step} in {directory} {self.what}: {detail}")


class NoReadableCheckpoint(CheckpointError):
    """Checkpoints exist but none of them can be restored (`restore_latest`, `restore_newest_common`)."""

    def __init__(self, problems: Sequence[UnreadableCheckpoint]):
        self.problems = list(problems)
        folders = sorted({p.directory for p in problems})
        damaged = [os.path.join(p.directory, str(p.step)) for p in problems]
        reasons = "; ".join(f"step {p.step} {p.what}: {p.detail.rstrip('.')}" for p in problems)
        choices = f"start fresh with another --workdir, or delete the unreadable steps (rm -r {' '.join(damaged)}) to restart in this one"
        if any(p.cause == UnreadableCheckpoint.ANOTHER_CONFIG for p in problems):
            choices = "rerun with the config they were saved with, " + choices
        super().__init__(f"No checkpoint in {', '.join(folders)} can be read ({reasons}). Choices: {choices}.")


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed (a full disk, a lost mount, ...); the older checkpoints are intact."""


# ---------------------------------------------------------------------------------------------
# Fingerprints: what tells a damaged array from the one that was saved


def _bits(x: jax.Array) -> jax.Array:
    """The bit patterns of `x`'s elements as a flat uint32 vector (8-byte elements give two words)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).ravel()


def _fingerprint(x: jax.Array) -> jax.Array:
    """Σ_i mix(bits_i, i) mod 2**32, where mix is a bijection of the bits for each index i.

    A sum of integers modulo 2**32 does not depend on the order of summation, so the result is
    the same whatever the array's sharding; and because mix(·, i) is a bijection, changing any
    one element always changes it (several changes cancel with probability about 2**-32)."""
    bits = _bits(x)
    h = bits ^ (jnp.arange(bits.size, dtype=jnp.uint32) * np.uint32(0x9E3779B1))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(15))
    h = h * np.uint32(0xC2B2AE35)
    h = h ^ (h >> np.uint32(13))
    return jnp.sum(h, dtype=jnp.uint32)


_fingerprints_jit = jax.jit(lambda leaves: [_fingerprint(x) for x in leaves])


def _array_leaves(tree: Any) -> list[tuple[str, Any]]:
    """(path, leaf) of every array leaf (jax/numpy arrays, ShapeDtypeStructs); paths as orbax names them ('params.w')."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [
        (jax.tree_util.keystr(path, simple=True, separator="."), leaf)
        for path, leaf in leaves
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype")
    ]


def fingerprints(tree: Any) -> dict[str, int]:
    """{path: 32-bit fingerprint of the array's bytes} for every array leaf of `tree`.

    Computed where the arrays live, one compiled program per set of devices; with several
    processes every process must call it (it is a collective) and gets the same numbers."""
    leaves = _array_leaves(tree)
    groups: dict[Any, list[int]] = {}
    for i, (_, leaf) in enumerate(leaves):
        devices = frozenset(d.id for d in leaf.sharding.device_set) if isinstance(leaf, jax.Array) else None
        groups.setdefault(devices, []).append(i)
    result = {}
    for indices in groups.values():
        values = _fingerprints_jit([leaves[i][1] for i in indices])
        for i, value in zip(indices, values):
            result[leaves[i][0]] = int(np.asarray(value.addressable_data(0)))
    return result


def _array_list(state: Any) -> dict[str, Any]:
    """The `arrays` item of a checkpoint: each array's shape, dtype and fingerprint, and the list's CRC."""
    prints = fingerprints(state)
    arrays = {
        path: {"shape": list(np.shape(leaf)), "dtype": str(leaf.dtype), "fingerprint": prints[path]}
        for path, leaf in _array_leaves(state)
    }
    return {"arrays": arrays, "crc32": _crc(arrays)}


def content_crc(tree: Any) -> int:
    """A CRC of every array of `tree`: its path, shape, dtype and byte fingerprint (what a checkpoint's
    list of arrays records); equal trees give equal numbers on every process."""
    return _array_list(tree)["crc32"]


def _crc(arrays: Mapping[str, Any]) -> int:
    return zlib.crc32(json.dumps(arrays, sort_keys=True).encode())


def _misfit(saved: Mapping[str, Any], abstract_state: Any) -> str | None:
    """Why the saved arrays do not fit the restore target (structure, shape, key type), or None."""
    wanted = dict(_array_leaves(abstract_state))
    for path in wanted:
        if path not in saved:
            return f"it has no array {path!r}, which this run's state has ({len(saved)} arrays saved, {len(wanted)} wanted)."
    for path in saved:
        if path not in wanted:
            return f"it holds an array {path!r}, which this run's state does not have."
    for path, leaf in wanted.items():
        shape, dtype = tuple(saved[path]["shape"]), saved[path]["dtype"]
        if shape != tuple(leaf.shape):
            return f"array {path!r} has shape {shape} there and {tuple(leaf.shape)} in this run."
        is_key = jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
        if (is_key or dtype.startswith("key<")) and dtype != str(leaf.dtype):
            return f"array {path!r} is a {dtype} there and a {leaf.dtype} in this run."
    return None


def _read_target(abstract_state: Any, saved: Mapping[str, Any]) -> Any:
    """The restore target with each array in the dtype it was saved in (verified, then cast)."""
    def leaf_target(path, leaf):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        if not hasattr(leaf, "dtype") or name not in saved or saved[name]["dtype"] == str(leaf.dtype):
            return leaf
        return jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(saved[name]["dtype"]), sharding=leaf.sharding)

    return jax.tree_util.tree_map_with_path(leaf_target, abstract_state)


def _cast_to(state: Any, abstract_state: Any) -> Any:
    """`state` with each array cast to the target's dtype (on the target's sharding) where they differ."""
    def cast(leaf, target):
        if not hasattr(target, "dtype") or leaf.dtype == target.dtype:
            return leaf
        return jax.device_put(leaf.astype(target.dtype), target.sharding)

    return jax.tree.map(cast, state, abstract_state)


def _failed_array(error: BaseException) -> str:
    """The array a tensorstore read error names (its kvstore path, e.g. 'params.w'), or ''."""
    for name in re.findall(r"""\\*["']path\\*["']:\s*\\*["']([^"'\\]+?)/?\\*["']""", str(error)):
        if not name.startswith("/"):
            return name
    return ""


def _first_line(error: BaseException) -> str:
    """An exception as one short line: tensorstore's spec dumps and later lines dropped."""
    text = re.split(r" \[tensorstore_spec| See full TensorStore details", str(error), maxsplit=1)[0].strip().splitlines()
    line = text[0] if text else ""
    return f"{type(error).__name__}: {line[:300]}"


def _all_processes_agree(ok: bool) -> bool:
    """True when `ok` holds in every process (a collective with several processes)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


# ---------------------------------------------------------------------------------------------
# Quiet failures: orbax's and tensorstore's ways of reporting them print walls of tracebacks


def _ignore_closed_loop_callbacks() -> None:
    """Drops the tracebacks a failed orbax read leaves behind after its error has been raised.

    When orbax gives up on a damaged checkpoint it closes its event loop while tensorstore still
    has reads in flight: each of them later calls `loop.call_soon_threadsafe` on the closed loop,
    and orbax's own read coroutines for the other arrays are dropped unfinished. Python prints
    each as an unraisable exception, dozens of tracebacks after the real error was reported. Those
    and only those are dropped (RuntimeError('Event loop is closed') from no object, and
    exceptions of orbax coroutines); anything else reaches the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_callbacks", False):
        return

    def hook(unraisable):
        error, source = unraisable.exc_value, unraisable.object
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed" and source is None:
            return
        code = getattr(source, "cr_code", None)
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
            return
        previous(unraisable)

    hook.drops_closed_loop_callbacks = True
    sys.unraisablehook = hook


class _OneLineOrbaxErrors(logging.Filter):
    """Keeps the message of orbax's error logs and drops their tracebacks: the error reaches the
    caller anyway, named by this module (`CheckpointSaveError`, `UnreadableCheckpoint`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname:
            record.msg = f"{record.getMessage()} ({_first_line(record.exc_info[1])})" if record.exc_info[1] else record.msg
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def _quiet_orbax_failures() -> None:
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _OneLineOrbaxErrors) for f in logger.filters):
        logger.addFilter(_OneLineOrbaxErrors())
    _ignore_closed_loop_callbacks()


# ---------------------------------------------------------------------------------------------
# Checkpointer


class Checkpointer:
    """Saves the training state when asked, keeps the newest `keep` checkpoints, restores verified.

    Usage in a training loop (steps counted from 1; a checkpoint at step t holds the state after
    t completed steps). The loop owns the cadence:

        checkpointer = Checkpointer(workdir / "checkpoints", keep=3)
        stop = install_sigterm_handler()
        start, state, _ = checkpointer.restore_latest(abstract, log) or (0, state, None)
        for t in range(start + 1, total + 1):
            state = train_step(state, ...)
            if stop.stop_requested() or t % 100 == 0 or t == total:
                checkpointer.save(t, state)
            if stop.stop_requested():
                break
        checkpointer.close()
        stop.close()
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int):
        """Opens (creating if needed) the checkpoint directory.

        Args:
          directory: where the step directories live; made absolute.
          keep: how many of the newest checkpoints to keep; older ones are deleted. Keep at least
            2 so that a damaged newest checkpoint leaves one to fall back to.
        """
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"Checkpointer: keep must be a positive int, got {keep!r}.")
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep = keep
        self._pending: int | None = None  # the step whose background write is under way
        self._save_error: CheckpointSaveError | None = None
        _quiet_orbax_failures()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        """The steps of the complete checkpoints in the directory, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None if there is none."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None) -> bool:
        """Starts saving `state` and `meta` as step `step`; returns whether it did.

        A step that is already saved, or older than the newest checkpoint, is never saved again
        (False). The write continues in the background; the arrays of `state` may be donated or
        deleted as soon as this returns. With several processes every process must call it.

        Args:
          step: the number of completed training steps the state holds.
          state: the training-state pytree.
          meta: a JSON-serializable dict (config, ...); None saves {}.

        Raises:
          CheckpointSaveError: this save, or the previous one still being written, failed.
        """
        step = _check_step(step, "save")
        meta = {} if meta is None else meta
        if not isinstance(meta, Mapping):
            raise ValueError(f"Checkpointer.save: meta must be a dict of JSON values, got {type(meta).__name__}.")
        try:
            json.dumps(dict(meta), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"Checkpointer.save: meta must hold JSON values only (str, finite numbers, bool, None, "
                f"lists, dicts): {e}. Convert arrays with .tolist() and configs with .to_dict()."
            ) from e
        self.wait_until_finished()
        latest = self.latest_step()
        if latest is not None and step <= latest:
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(dict(meta)),
            arrays=ocp.args.JsonSave(_array_list(state)),
        )
        try:
            saved = bool(self._manager.save(step, args=args, force=True))
        except Exception as e:  # orbax and the file system raise many kinds; all mean "not saved"
            raise self._save_failed(step, e) from e
        self._pending = step if saved else None
        return saved

    def _save_failed(self, step: int, error: BaseException) -> CheckpointSaveError:
        """The named error of a failed save of `step`; remembered, so that every later wait raises it too."""
        intact = [t for t in self.all_steps() if t < step]
        hint = "free some space" if isinstance(error, OSError) and error.errno == errno.ENOSPC else "fix the cause"
        if intact:
            then = f"The checkpoint of step {intact[-1]} is intact: {hint} and rerun the same command to resume from it."
        else:
            then = f"There is no earlier checkpoint: {hint} and rerun the same command to start over."
        self._save_error = CheckpointSaveError(
            f"Saving the checkpoint of step {step} into {self.directory} failed ({_first_line(error)}). {then}"
        )
        return self._save_error

    def restore(self, step: int | None = None, *, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores one complete checkpoint onto `abstract_state`'s structure, shardings and dtypes, verified.

        Args:
          step: which checkpoint; None means the newest (without falling back: see `restore_latest`).
          abstract_state: the restore target, e.g. `abstract_like(jax.eval_shape(init, ...), shardings)`
            (see the module docstring). Arrays are cast to its dtypes.

        Returns:
          (state, meta): the state pytree and the JSON dict saved with it.

        Raises:
          FileNotFoundError: there is no complete checkpoint (at `step`) in the directory.
          UnreadableCheckpoint: the checkpoint is damaged or was saved with another config (a ValueError).
        """
        self.wait_until_finished()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(
                    f"No complete checkpoint in {self.directory}. Start a fresh run, or point the "
                    f"checkpoint directory at a run that has saved one."
                )
            step = steps[-1]
        step = _check_step(step, "restore")
        if step not in steps:
            raise FileNotFoundError(
                f"No complete checkpoint for step {step} in {self.directory}; the complete ones are "
                f"steps {steps}. Pass one of them, or step=None for the newest."
            )
        return self._read(step, abstract_state)

    def restore_latest(
        self, abstract_state: Any, log: Callable[[str], None] = print
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """Restores the newest checkpoint that can be read: (step, state, meta), or None if there is none.

        A checkpoint that cannot be read is reported through `log` (step, array, cause) and the one
        before it is tried; see `restore_newest_common`, which this is for one Checkpointer.

        Raises:
          NoReadableCheckpoint: there are checkpoints, and none of them can be read.
        """
        restored = restore_newest_common([self], abstract_state, log)
        if restored is None:
            return None
        step, states, metas = restored
        return step, states[0], metas[0]

    def _read(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Reads step `step` (known to be complete) and verifies it; raises UnreadableCheckpoint."""
        folder = os.path.join(self.directory, str(step))
        unreadable = lambda cause, detail: UnreadableCheckpoint(step, self.directory, cause, detail)
        if not os.path.exists(os.path.join(folder, COMMIT_MARKER)):
            raise unreadable(UnreadableCheckpoint.DAMAGED, f"its save did not finish (no {COMMIT_MARKER} in {folder}).")
        saved = None
        if os.path.isdir(os.path.join(folder, "arrays")):
            try:
                listing = self._manager.restore(step, args=ocp.args.Composite(arrays=ocp.args.JsonRestore())).arrays
                saved = listing["arrays"]
                intact = listing["crc32"] == _crc(saved)
            except Exception as e:  # unreadable JSON, a missing file, a wrong type: all damage
                raise unreadable(UnreadableCheckpoint.DAMAGED, f"its list of arrays cannot be read ({_first_line(e)}).") from e
            if not intact:
                raise unreadable(UnreadableCheckpoint.DAMAGED, "its list of arrays does not match its CRC.")
            misfit = _misfit(saved, abstract_state)
            if misfit:
                raise unreadable(UnreadableCheckpoint.ANOTHER_CONFIG, misfit)
        target = abstract_state if saved is None else _read_target(abstract_state, saved)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        error = None
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:  # tensorstore, orbax and JSON raise many kinds for damaged files
            error = e
        if not _all_processes_agree(error is None):
            if error is None:
                raise unreadable(UnreadableCheckpoint.DAMAGED, "another process could not read its part of it.")
            name = _failed_array(error)
            array = f"array {name!r}" if name else "its files"
            cause = UnreadableCheckpoint.UNKNOWN if saved is None else UnreadableCheckpoint.DAMAGED
            raise unreadable(cause, f"reading {array} failed ({_first_line(error)}).") from error
        state = restored.state
        if saved is not None:
            for path, value in fingerprints(state).items():
                if value != saved[path]["fingerprint"]:
                    raise unreadable(
                        UnreadableCheckpoint.DAMAGED,
                        f"array {path!r} does not hold the bytes that were saved (its fingerprint is {value}, "
                        f"{saved[path]['fingerprint']} was saved).",
                    )
            state = _cast_to(state, abstract_state)
        return state, dict(restored.meta)

    def set_aside(self, step: int) -> str:
        """Moves step `step`'s folder to `<dir>/<step>.unreadable` (process 0; every process calls it); returns the new path."""
        source = os.path.join(self.directory, str(step))
        target, n = source + UNREADABLE_SUFFIX, 1
        while os.path.exists(target):
            n += 1
            target = f"{source}{UNREADABLE_SUFFIX}-{n}"
        if jax.process_index() == 0:
            os.rename(source, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"bond.checkpoint:set_aside:{source}")
        self._manager.reload()
        return target

    def wait_until_finished(self) -> None:
        """Blocks until the background write of the last save (if any) is complete.

        Raises:
          CheckpointSaveError: that write failed.
        """
        if self._save_error is not None:
            raise self._save_error
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # whatever the write raised in its thread
            raise self._save_failed(self._pending if self._pending is not None else -1, e) from e
        finally:
            self._pending = None

    def close(self) -> None:
        """Waits for the last save to complete and releases orbax's resources.

        Raises:
          CheckpointSaveError: the last save failed (orbax's resources are released all the same).
        """
        try:
            self.wait_until_finished()
        finally:
            try:
                self._manager.close()
            except Exception:  # the failed save again; already raised as CheckpointSaveError
                if self._save_error is None:
                    raise

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _check_step(step: Any, fn: str) -> int:
    """`step` as a Python int (it may be a scalar array), after checking it is a count."""
    try:
        value = int(step)
        is_count = not isinstance(step, bool) and value == step and value >= 0
    except (TypeError, ValueError):
        is_count = False
    if not is_count:
        raise ValueError(f"Checkpointer.{fn}: step must be a non-negative integer, got {step!r}.")
    return value


def common_steps(checkpointers: Sequence[Checkpointer]) -> list[int]:
    """The steps at which every checkpointer has a complete checkpoint, ascending."""
    if not checkpointers:
        return []
    return sorted(set.intersection(*(set(c.all_steps()) for c in checkpointers)))


def restore_newest_common(
    checkpointers: Sequence[Checkpointer], abstract_state: Any, log: Callable[[str], None] = print
) -> tuple[int, list[Any], list[dict[str, Any]]] | None:
    """Restores the newest step that every checkpointer can read: (step, [state], [meta]), one per checkpointer.

    The steps all of them hold are tried newest first. A step that one of them cannot read
    (`UnreadableCheckpoint`: which step, which array, damaged or another config) is reported
    through `log` and the next older common step is tried. Once a step is restored, the unreadable
    newer steps are moved aside (`Checkpointer.set_aside`) so that the resumed run writes them anew.

    Returns:
      None when the checkpointers have no step in common (nothing to resume: start at step 0).

    Raises:
      NoReadableCheckpoint: there are common steps and none of them can be read by all.
    """
    problems: list[tuple[Checkpointer, UnreadableCheckpoint]] = []
    for c in checkpointers:
        c.wait_until_finished()
    candidates = common_steps(checkpointers)
    for step in reversed(candidates):
        try:
            restored = []
            for c in checkpointers:
                try:
                    restored.append(c._read(step, abstract_state))
                except UnreadableCheckpoint as e:
                    problems.append((c, e))
                    raise
        except UnreadableCheckpoint as e:
            log(f"{e} Trying the checkpoint before it.")
            continue
        for c, problem in problems:
            log(f"Moved the unreadable checkpoint of step {problem.step} to {c.set_aside(problem.step)}; delete it when you no longer need it.")
        return step, [s for s, _ in restored], [m for _, m in restored]
    if problems:
        raise NoReadableCheckpoint([p for _, p in problems])
    return None

# ---------------------------------------------------------------------------------------------
# SIGTERM: save, then exit


class StopSignal:
    """A SIGTERM handler that only records the request; the training loop polls it.

    The loop checks `stop_requested()` after each completed step; when it is True, the loop saves
    a checkpoint of that step (`Checkpointer.save(step, ...)`), closes the
    checkpointer and returns normally, so the process exits with code 0. Rerunning the same
    command resumes from that checkpoint. Doing the save in the loop rather than in the handler
    keeps it out of a half-finished step.

    Create it with `install_sigterm_handler` (from the main thread, as Python requires for signal
    handlers); `close` puts the previous handler back.
    """

    def __init__(self, callback: Callable[[], None] | None = None):
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("install_sigterm_handler must be called from the main thread (a Python rule for signals).")
        self._callback = callback
        self._requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._closed = False

    def _handle(self, signum: int, frame: Any) -> None:
        del signum, frame
        self._requested = True
        if self._callback is not None:
            self._callback()

    def stop_requested(self) -> bool:
        """True once SIGTERM has arrived (in any process of a multi-process run).

        With several processes every process must call this at the same step (it is a collective),
        so that they all stop, and save, at the same step.
        """
        if jax.process_count() == 1:
            return self._requested
        flags = multihost_utils.process_allgather(np.asarray(self._requested, np.int32))
        return bool(np.any(flags))

    def close(self) -> None:
        """Restores the SIGTERM handler that was installed before this one."""
        if not self._closed:
            signal.signal(signal.SIGTERM, self._previous)
            self._closed = True

    def __enter__(self) -> StopSignal:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def install_sigterm_handler(callback: Callable[[], None] | None = None) -> StopSignal:
    """Installs a SIGTERM handler that sets a flag (see `StopSignal`); returns it.

    Args:
      callback: called inside the handler, e.g. to log that a stop was requested. It runs in the
        main thread between two Python bytecodes, so it must be quick and must not save.
    """
    return StopSignal(callback)
