"""Checkpoints: exact round trips, the save/keep schedule, crashes during a save, SIGTERM."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from bond.checkpoint import Checkpointer, abstract_like, install_sigterm_handler

TMP_MARKER = ".orbax-checkpoint-tmp"
SUBPROCESS_TIMEOUT_S = 120


def _train_state():
    """A training state shaped like the online loop's, after one Adam step."""
    return {**_jitted_train_state(), "data_position": 1234}


@jax.jit  # One compilation instead of dozens of eager ops.
def _jitted_train_state():
    params = {
        "embed": jnp.arange(24, dtype=jnp.float32).reshape(8, 3) / 7.0,
        "head": {"w": jnp.linspace(-1.0, 1.0, 6, dtype=jnp.bfloat16).reshape(3, 2), "b": jnp.zeros(2)},
    }
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)
    grads = jax.tree.map(lambda p: jnp.cos(p.astype(jnp.float32)).astype(p.dtype), params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return {
        "params": params,
        "anchor_params": jax.tree.map(lambda p: p * 2, params),
        "opt_state": opt_state,
        "algo_state": None,
        "step": jnp.int32(7),
        "rng": jax.random.key(42),
        "rbg_rng": jax.random.split(jax.random.key(3, impl="rbg"), 2),
    }


def _assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        if isinstance(e, jax.Array) and jnp.issubdtype(e.dtype, jax.dtypes.prng_key):
            assert a.dtype == e.dtype and jax.random.key_impl(a) == jax.random.key_impl(e)
            a, e = jax.random.key_data(a), jax.random.key_data(e)
        assert np.asarray(a).dtype == np.asarray(e).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_round_trip_is_exact(tmp_path):
    state = _train_state()
    meta = {"config": {"algorithm": "bond", "beta": 0.5}, "data_position": 1234}
    with Checkpointer(tmp_path, keep=2) as checkpointer:
        assert checkpointer.save(7, state, meta)

    # A fresh process would build the target without allocating: eval_shape, then shardings.
    # eval_shape turns the Python int data_position into an int32 array; abstract_like keeps it.
    abstract = abstract_like(jax.eval_shape(lambda: state))
    abstract["data_position"] = state["data_position"]
    with Checkpointer(tmp_path, keep=2) as checkpointer:
        assert checkpointer.latest_step() == 7
        restored, restored_meta = checkpointer.restore(abstract_state=abstract)

    _assert_trees_equal(restored, state)
    assert restored_meta == meta
    assert type(restored["data_position"]) is int
    # The restored typed key draws the same numbers as the saved one.
    assert jax.random.uniform(restored["rng"]) == jax.random.uniform(state["rng"])
    assert type(restored["opt_state"][0]) is type(state["opt_state"][0])


def test_restore_places_arrays_on_the_target_shardings(tmp_path):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    state = {"w": jnp.arange(32.0).reshape(4, 8), "keys": jax.random.split(jax.random.key(0), 8)}
    saved_key_data = np.asarray(jax.random.key_data(state["keys"]))
    shardings = {"w": NamedSharding(mesh, PartitionSpec(None, "data")), "keys": NamedSharding(mesh, PartitionSpec("data"))}
    abstract = abstract_like(jax.eval_shape(lambda: state), shardings)
    # The target's dtype wins: float32 is saved, bfloat16 is restored.
    abstract["w"] = jax.ShapeDtypeStruct((4, 8), jnp.bfloat16, sharding=shardings["w"])
    with Checkpointer(tmp_path, keep=1) as checkpointer:
        checkpointer.save(1, state)
        # The arrays are on the host once save returns: a donating train step may reuse them.
        state["w"].delete()
        state["keys"].delete()
        restored, meta = checkpointer.restore(abstract_state=abstract)
    assert meta == {}
    assert restored["w"].sharding == shardings["w"] and restored["keys"].sharding == shardings["keys"]
    assert restored["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(restored["w"], np.float32), np.arange(32.0).reshape(4, 8))
    np.testing.assert_array_equal(jax.random.key_data(restored["keys"]), saved_key_data)


def test_saves_the_steps_it_is_given_and_keeps_the_newest_m(tmp_path):
    with Checkpointer(tmp_path, keep=2) as checkpointer:
        for t in (3, 6, 9):  # the caller owns the cadence
            assert checkpointer.save(t, {"x": jnp.full((2,), t)}, {"t": t})
        checkpointer.wait_until_finished()
        assert checkpointer.all_steps() == [6, 9]
        assert checkpointer.save(10, {"x": jnp.full((2,), 10)}, {"t": 10})
        # A saved step, or one older than the newest checkpoint, is never written again.
        assert not checkpointer.save(10, {"x": jnp.zeros(2)})
        assert not checkpointer.save(8, {"x": jnp.zeros(2)})
        checkpointer.wait_until_finished()
        assert checkpointer.all_steps() == [9, 10]
        target = {"x": jax.ShapeDtypeStruct((2,), jnp.int32)}
        for step in (9, 10):
            state, meta = checkpointer.restore(step, abstract_state=target)
            np.testing.assert_array_equal(state["x"], [step, step])
            assert meta == {"t": step}


def test_bad_arguments_and_missing_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path, keep=0)
    target = {"x": jax.ShapeDtypeStruct((2,), jnp.float32)}
    with Checkpointer(tmp_path / "empty", keep=1) as checkpointer:
        with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
            checkpointer.restore(abstract_state=target)
    with Checkpointer(tmp_path / "run", keep=1) as checkpointer:
        with pytest.raises(ValueError, match="JSON"):
            checkpointer.save(1, {"x": jnp.zeros(2)}, {"position": np.int64(3)})
        with pytest.raises(ValueError, match="step"):
            checkpointer.save(-1, {"x": jnp.zeros(2)})
        checkpointer.save(1, {"x": jnp.zeros(2)})
        with pytest.raises(FileNotFoundError, match=r"step 5 .*steps \[1\]"):
            checkpointer.restore(5, abstract_state=target)
        with pytest.raises(ValueError, match="saved with another config: it has no array 'y'"):
            checkpointer.restore(abstract_state={"y": target["x"]})
        with pytest.raises(ValueError, match=r"saved with another config: array 'x' has shape \(2,\) there and \(3,\)"):
            checkpointer.restore(abstract_state={"x": jax.ShapeDtypeStruct((3,), jnp.float32)})


# ---------------------------------------------------------------------------------------------
# Crashes: the child processes import bond afresh (a few seconds each).

# Saves step after step of a 16 MiB state that does not compress (so each write takes a while),
# resuming after the newest complete checkpoint like a rerun of the same command.
_SAVE_FOREVER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from bond.checkpoint import Checkpointer

    base = np.random.default_rng(0).standard_normal(1 << 22).astype(np.float32)
    checkpointer = Checkpointer(sys.argv[1], keep=2)
    start = (checkpointer.latest_step() or 0) + 1
    for t in range(start, start + 10_000):
        checkpointer.save(t, {"big": base + np.float32(t), "step": np.int32(t)}, {"step": t})
    """
)


def _tmp_dirs(directory):
    return sorted(name for name in os.listdir(directory) if TMP_MARKER in name)


def _files_under(path):
    return sum(len(files) for _, _, files in os.walk(path))


def _writing_array_data(directory):
    """Whether a temporary step directory holds array data while its state item is unfinished."""
    for name in _tmp_dirs(directory):
        step_dir = directory / name
        unfinished = [item for item in os.listdir(step_dir) if item.startswith("state") and TMP_MARKER in item]
        if unfinished and _files_under(step_dir / unfinished[0]) > 0:
            return True
    return False


def _kill_during_a_save(directory):
    """Starts the saving child and SIGKILLs it while a step's arrays are being written."""
    child = subprocess.Popen([sys.executable, "-c", _SAVE_FOREVER, str(directory)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    try:
        while time.monotonic() < deadline and child.poll() is None:
            try:
                due = any(name.isdigit() for name in os.listdir(directory)) and _writing_array_data(directory)
            except FileNotFoundError:  # not created yet, or renamed while we looked
                due = False
            if due:
                child.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        else:
            pytest.fail(f"the saving child never had a save in progress:\n{child.stderr.read().decode()[-3000:]}")
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    return _tmp_dirs(directory)


def test_sigkill_during_a_save_leaves_the_last_complete_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints"
    # The kill lands between seeing a temporary directory and its rename with a tiny probability;
    # a rerun (which resumes, as a user's rerun would) then tries again.
    for _ in range(3):
        partial = _kill_during_a_save(directory)
        if _writing_array_data(directory):
            break
    assert _writing_array_data(directory), "no kill of three landed while a step's arrays were being written"
    partial_steps = {int(name.split(".")[0]) for name in partial}

    base = np.random.default_rng(0).standard_normal(1 << 22).astype(np.float32)
    target = {
        "big": jax.ShapeDtypeStruct(base.shape, jnp.float32),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    with Checkpointer(directory, keep=2) as checkpointer:
        latest = checkpointer.latest_step()
        assert latest is not None
        assert not partial_steps & set(checkpointer.all_steps())
        state, meta = checkpointer.restore(abstract_state=target)
        assert int(state["step"]) == latest and meta == {"step": latest}
        np.testing.assert_array_equal(np.asarray(state["big"]), base + np.float32(latest))
        # The interrupted step can be saved again, and the temporary directory is cleaned up.
        next_step = max(partial_steps)
        assert checkpointer.save(next_step, {"big": base, "step": np.int32(next_step)}, {"step": next_step})
    assert _tmp_dirs(directory) == []


_LOOP_UNTIL_SIGTERM = textwrap.dedent(
    """
    import sys, time
    import jax.numpy as jnp
    from bond.checkpoint import Checkpointer, install_sigterm_handler

    checkpointer = Checkpointer(sys.argv[1], keep=2)
    stop = install_sigterm_handler()
    state = {"x": jnp.zeros(4), "step": jnp.int32(0)}
    for t in range(1, 100_000):
        state = {"x": state["x"] + 1.0, "step": state["step"] + 1}
        if t == 3:
            print("running", flush=True)
        if stop.stop_requested():
            checkpointer.save(t, state, {"step": t})
            checkpointer.close()
            stop.close()
            print(f"saved {t}", flush=True)
            sys.exit(0)
        time.sleep(0.005)
    sys.exit(3)
    """
)


def test_sigterm_saves_the_last_completed_step_and_exits_cleanly(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", _LOOP_UNTIL_SIGTERM, str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout.readline().strip() == "running", child.stderr.read()[-3000:]
        child.send_signal(signal.SIGTERM)
        stdout, stderr = child.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, stderr[-3000:]
    saved_step = int(stdout.split()[-1])
    assert saved_step >= 3

    target = {"x": jax.ShapeDtypeStruct((4,), jnp.float32), "step": jax.ShapeDtypeStruct((), jnp.int32)}
    with Checkpointer(tmp_path, keep=2) as checkpointer:
        assert checkpointer.all_steps() == [saved_step]
        state, meta = checkpointer.restore(abstract_state=target)
    assert int(state["step"]) == saved_step and meta == {"step": saved_step}
    np.testing.assert_array_equal(state["x"], np.full(4, saved_step, np.float32))


def test_sigterm_handler_sets_the_flag_and_close_restores_the_previous_handler():
    previous = signal.getsignal(signal.SIGTERM)
    calls = []
    with install_sigterm_handler(lambda: calls.append("stop")) as stop:
        assert not stop.stop_requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.stop_requested()
        assert calls == ["stop"]
    assert signal.getsignal(signal.SIGTERM) is previous


def test_checkpoints_written_before_the_array_list_still_restore(tmp_path):
    """A checkpoint as this module wrote it before (state + meta with a data_position, no 'arrays'
    item) restores, unverified; a misfit cannot be told from damage, and the message says so."""
    import orbax.checkpoint as ocp

    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(5)}
    with ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(create=True)) as manager:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"data_position": 80}))
        manager.save(5, args=args, force=True)
    with Checkpointer(tmp_path, keep=2) as checkpointer:
        step, restored, meta = checkpointer.restore_latest(jax.eval_shape(lambda: state))
        with pytest.raises(ValueError, match="does not fit this run.s state or is damaged"):
            checkpointer.restore(abstract_state={"v": jax.ShapeDtypeStruct((2, 3), jnp.float32)})
    assert step == 5 and meta == {"data_position": 80}
    _assert_trees_equal(restored, state)
