"""Checkpoints of a training run: a thin layer over orbax's CheckpointManager, and SIGTERM handling.

A checkpoint at step t holds two items:

  state  the training-state pytree (policy and anchor parameters, optimizer state, algorithm
         state, step, PRNG key, ...) saved with `ocp.args.StandardSave`: arrays of any sharding,
         typed PRNG keys (orbax stores `jax.random.key_data` and rewraps it with the key type of
         the restore target), numpy arrays and Python scalars; None subtrees stay None;
  meta   a JSON dict (the config, the data position, ...) saved with `ocp.args.JsonSave`.

What a crash can and cannot do. Orbax writes step t into `<dir>/<t>.orbax-checkpoint-tmp-<n>/`
and renames it to `<dir>/<t>/` only after every item is written (on a local or POSIX file system;
on object stores it writes `commit_success.txt` last instead). A process killed at any moment
(SIGKILL, during a save too) therefore leaves the complete checkpoints it had plus at most one
temporary directory, which `latest_step` / `restore` never see and which the next `Checkpointer`
on the directory deletes. Old checkpoints beyond `keep` are deleted only after the new one is
complete. `tests/test_checkpoint.py` checks this by killing a process in the middle of its saves.

Saving is asynchronous: `save` returns once the arrays are copied to host memory (so the caller
may donate or delete them right away) and a background thread writes them. `close` (or
`wait_until_finished`) waits for the write; call it before the process exits.

The restore target. `restore` places every array onto the sharding and dtype of an abstract
target, a pytree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` that allocates nothing:

    abstract = jax.eval_shape(init_train_state, config, key)         # shapes and dtypes only
    abstract = abstract_like(abstract, shardings)                     # + where each array lives
    state, meta = checkpointer.restore(abstract_state=abstract)

where `shardings` is a matching pytree of `jax.sharding.Sharding` (e.g. built with
`bond.sharding.param_shardings` / `shardings_like_params`). A typed PRNG key's abstract leaf keeps
its key dtype (`key<fry>`, ...), so the key comes back typed with the same implementation.
`jax.eval_shape` turns a Python int leaf into an int32 array; values that must come back as
Python numbers (a data position beyond 2**31, say) belong in `meta`.

References:
  orbax-checkpoint CheckpointManager: https://orbax.readthedocs.io/en/stable/guides/checkpoint/orbax_checkpoint_api_overview.html
  atomic step directories: orbax/checkpoint/_src/path/atomicity.py (orbax-checkpoint 0.12).
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

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
# Checkpointer


class Checkpointer:
    """Saves the training state every `save_every` steps, keeping the newest `keep` checkpoints.

    Usage in a training loop (steps counted from 1; a checkpoint at step t holds the state after
    t completed steps):

        checkpointer = Checkpointer(workdir / "checkpoints", save_every=100, keep=3)
        stop = install_sigterm_handler()
        if checkpointer.latest_step() is not None:
            state, meta = checkpointer.restore(abstract_state=abstract)
        for t in range(start + 1, total + 1):
            state = train_step(state, ...)
            meta = {"data_position": position}
            if stop.stop_requested():
                checkpointer.save(t, state, meta, force=True)
                break
            checkpointer.save(t, state, meta, force=t == total)   # a no-op unless t % 100 == 0
        checkpointer.close()
        stop.close()
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int):
        """Opens (creating if needed) the checkpoint directory.

        Args:
          directory: where the step directories live; made absolute.
          save_every: `save` writes step t when t % save_every == 0 (or when forced).
          keep: how many of the newest checkpoints to keep; older ones are deleted.
        """
        if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1:
            raise ValueError(f"Checkpointer: save_every must be a positive int, got {save_every!r}.")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"Checkpointer: keep must be a positive int, got {keep!r}.")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        self.keep = keep
        # Orbax's default policy would also save the very first step it sees; saving exactly at
        # the multiples of save_every keeps "every K steps" literal. The preemption policy saves
        # at a multi-host preemption sync point (a no-op in a single process).
        policy = ocp.checkpoint_managers.AnySavePolicy(
            [
                ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
                ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_decision_policy=policy,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        """The steps of the complete checkpoints in the directory, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None if there is none."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None, *, force: bool = False) -> bool:
        """Starts saving `state` and `meta` as step `step` if it is due; returns whether it did.

        Due means step % save_every == 0, or `force` (use it for the last step and on SIGTERM).
        A step that is already saved, or older than the newest checkpoint, is never saved again.
        The write continues in the background; the arrays of `state` may be donated or deleted
        as soon as this returns.

        Args:
          step: the number of completed training steps the state holds.
          state: the training-state pytree.
          meta: a JSON-serializable dict (config, data position, ...); None saves {}.
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
        latest = self.latest_step()
        if latest is not None and step <= latest:
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta)))
        return bool(self._manager.save(step, args=args, force=force))

    def restore(self, step: int | None = None, *, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores a complete checkpoint onto `abstract_state`'s structure, shardings and dtypes.

        Args:
          step: which checkpoint; None means the newest.
          abstract_state: the restore target, e.g. `abstract_like(jax.eval_shape(init, ...), shardings)`
            (see the module docstring). Arrays are cast to its dtypes.

        Returns:
          (state, meta): the state pytree and the JSON dict saved with it.

        Raises:
          FileNotFoundError: there is no complete checkpoint (at `step`) in the directory.
          ValueError: the checkpoint's structure or shapes differ from `abstract_state`.
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
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except ValueError as e:
            raise ValueError(
                f"The checkpoint at step {step} in {self.directory} does not fit abstract_state "
                f"(was the run saved with another config or model?): {e}"
            ) from e
        return restored.state, dict(restored.meta)

    def wait_until_finished(self) -> None:
        """Blocks until the background write of the last save (if any) is complete."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the last save to complete and releases orbax's resources."""
        self._manager.close()

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


# ---------------------------------------------------------------------------------------------
# SIGTERM: save, then exit


class StopSignal:
    """A SIGTERM handler that only records the request; the training loop polls it.

    The loop checks `stop_requested()` after each completed step; when it is True, the loop saves
    a checkpoint of that step (`Checkpointer.save(step, ..., force=True)`), closes the
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
