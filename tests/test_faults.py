"""Faults: a run never loses more than the steps since its last good checkpoint, and a mistake on
the command line ends in one line and exit status 2.

Each fault test damages a run the way the fault would (bytes flipped in the newest checkpoint, a
save killed before its commit marker, a full disk during a save, one of two processes killed),
reruns it, and checks that it ends exactly where an uninterrupted run ends. The runs are
configs/j_bond.py:quick shrunk to 4 steps with checkpoints at steps 2 and 4; they share one
uninterrupted run and one reference model.
"""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import distributed_worker as worker
from bond import main as cli
from bond import train
from bond.checkpoint import (
    Checkpointer,
    CheckpointSaveError,
    NoReadableCheckpoint,
    UnreadableCheckpoint,
    restore_newest_common,
)
from bond.config_base import load_config
from bond.metrics import read_metrics
from bond.validation import ConfigError, validate
from test_distributed import WORKER, _free_port, _run_processes, _worker_env
from conftest import xla_flags

ROOT = Path(__file__).resolve().parents[1]
J_BOND = ROOT / "configs" / "j_bond.py"
QUIET = lambda _: None  # noqa: E731


def tiny_run(cache_dir):
    """configs/j_bond.py:quick with a one-layer model: 4 steps, checkpoints at 2 and 4, evaluations at 0 and 4."""
    c = load_config(f"{J_BOND}:quick")
    c.cache_dir = str(cache_dir)
    c.model.update(num_layers=1, d_model=32, num_heads=2, d_ff=64)
    c.reference.update(steps=20, corpus_size=512, batch_size=32)
    c.update(steps=4, batch_size=8, log_every=1, num_devices=1)
    c.eval.update(every=4, num_prompts=2)
    c.checkpoint.update(every=2, keep=2)
    return c


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bond_cache")


@pytest.fixture(scope="module")
def uninterrupted(cache_dir, tmp_path_factory):
    """The run every fault test must end like: (its workdir, its metrics)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    train.run(tiny_run(cache_dir), workdir, log=QUIET)
    assert Checkpointer(workdir / "checkpoints", keep=2).all_steps() == [2, 4]
    return workdir, read_metrics(workdir / "metrics.jsonl")


def copy_of(uninterrupted, tmp_path) -> Path:
    """A copy of the uninterrupted run's workdir, to damage."""
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], workdir)
    return workdir


def rerun(cache_dir, workdir) -> list[str]:
    """Reruns the same config in `workdir`; returns what it logged."""
    lines = []
    train.run(tiny_run(cache_dir), workdir, log=lines.append)
    return lines


def flip_bytes(path: Path, count: int = 16) -> None:
    """Inverts `count` bytes in the middle of the file."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, min(middle + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def array_files(step_dir: Path) -> list[Path]:
    """The files that hold a checkpoint's array data (orbax's OCDBT data files), largest first."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints


def test_fault_flipped_bytes_in_the_newest_checkpoint_resume_from_the_one_before(cache_dir, uninterrupted, tmp_path):
    workdir = copy_of(uninterrupted, tmp_path)
    for path in array_files(workdir / "checkpoints" / "4"):
        flip_bytes(path)
    log = rerun(cache_dir, workdir)
    report = next(line for line in log if "step 4" in line)
    assert "is damaged" in report and str(workdir / "checkpoints") in report
    assert any("Resumed from the checkpoint at step 2" in line for line in log)
    assert (workdir / "checkpoints" / "4.unreadable").is_dir()  # moved aside; step 4 was written anew
    assert read_metrics(workdir / "metrics.jsonl") == uninterrupted[1]


def test_fault_save_killed_before_its_commit_marker_resumes_from_the_one_before(cache_dir, uninterrupted, tmp_path):
    workdir = copy_of(uninterrupted, tmp_path)
    (workdir / "checkpoints" / "4" / "commit_success.txt").unlink()
    log = rerun(cache_dir, workdir)
    assert any("step 4" in line and "its save did not finish" in line for line in log)
    assert read_metrics(workdir / "metrics.jsonl") == uninterrupted[1]


def test_fault_disk_full_during_a_save_names_the_error_and_keeps_the_previous_checkpoint(
    cache_dir, uninterrupted, tmp_path, monkeypatch
):
    """The save of step 4 fails as a full disk would make it (ENOSPC while its files are written)."""
    from orbax.checkpoint._src.path import async_path

    write_text = async_path.write_text

    async def disk_full_in_step_4(path, *args, **kwargs):
        if "/checkpoints/4." in str(path):  # step 4's temporary folder
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return await write_text(path, *args, **kwargs)

    monkeypatch.setattr(async_path, "write_text", disk_full_in_step_4)
    workdir = tmp_path / "run"
    with pytest.raises(CheckpointSaveError, match=r"step 4 .*No space left on device.*step 2 is intact"):
        train.run(tiny_run(cache_dir), workdir, log=QUIET)
    monkeypatch.undo()
    with Checkpointer(workdir / "checkpoints", keep=2) as checkpointer:
        assert checkpointer.all_steps() == [2]
    rerun(cache_dir, workdir)
    assert read_metrics(workdir / "metrics.jsonl") == uninterrupted[1]


def _save_two_steps(directory, state):
    with Checkpointer(directory, keep=2) as checkpointer:
        checkpointer.save(1, state)
        checkpointer.save(2, jax.tree.map(lambda x: x + 1, state))


def test_fault_no_readable_checkpoint_stops_naming_the_folder_and_the_choices(tmp_path):
    state = {"w": jnp.arange(768.0).reshape(2, 384), "b": jnp.zeros(3)}  # w: stored apart from orbax's index
    target = jax.eval_shape(lambda: state)
    _save_two_steps(tmp_path / "damaged", state)
    for step in (1, 2):
        for path in array_files(tmp_path / "damaged" / str(step)):
            flip_bytes(path)
    with Checkpointer(tmp_path / "damaged", keep=2) as checkpointer:
        with pytest.raises(NoReadableCheckpoint) as error:
            checkpointer.restore_latest(target, QUIET)
    message = str(error.value)
    assert f"No checkpoint in {tmp_path / 'damaged'} can be read" in message
    assert "another --workdir" in message and f"rm -r {tmp_path / 'damaged' / '2'} {tmp_path / 'damaged' / '1'}" in message
    assert {p.cause for p in error.value.problems} == {UnreadableCheckpoint.DAMAGED}

    # Another config (other shapes) is told apart from damage, and named as such.
    _save_two_steps(tmp_path / "other", state)
    with Checkpointer(tmp_path / "other", keep=2) as checkpointer:
        with pytest.raises(NoReadableCheckpoint, match=r"step 2 was saved with another config: array 'w' has shape \(2, 384\) there and \(384, 2\)"):
            checkpointer.restore_latest({**target, "w": jax.ShapeDtypeStruct((384, 2), jnp.float32)}, QUIET)
        assert checkpointer.all_steps() == [1, 2]  # nothing moved aside when nothing could be read


def test_fault_population_falls_back_to_the_newest_step_every_member_can_read(tmp_path):
    """Member a's step 2 is damaged, b's is fine: both resume from step 1, and only a's step 2 is set aside."""
    state = {"w": jnp.arange(1024.0)}
    for member in ("a", "b"):
        _save_two_steps(tmp_path / member, state)
    for path in array_files(tmp_path / "a" / "2"):
        flip_bytes(path)
    log = []
    checkpointers = [Checkpointer(tmp_path / m, keep=2) for m in ("a", "b")]
    step, states, _ = restore_newest_common(checkpointers, jax.eval_shape(lambda: state), log.append)
    for c in checkpointers:
        c.close()
    assert step == 1 and all(np.array_equal(s["w"], np.arange(1024.0)) for s in states)
    assert any(str(tmp_path / "a") in line and "step 2" in line for line in log)
    assert sorted(os.listdir(tmp_path / "a")) == ["1", "2.unreadable"] and sorted(os.listdir(tmp_path / "b")) == ["1", "2"]


# ---------------------------------------------------------------------------------------------
# One of two processes killed


HEARTBEAT_TIMEOUT_S = 10


def test_fault_one_of_two_processes_killed_the_other_stops_and_a_rerun_resumes(tmp_path):
    """Process 1 is SIGKILLed after the checkpoint of step 1; process 0 stops within the heartbeat
    timeout, naming the cause: its next collective fails when the connection closes
    (bond.main.exit_if_a_process_died), or, waiting in a barrier, JAX's coordination service ends
    it ("another task died"). Rerunning both resumes from step 1 and ends like the single-device run."""
    host_params = worker.random_params()
    worker.save_params(tmp_path / "init.npz", host_params)
    checkpoints, port = tmp_path / "checkpoints", _free_port()

    def command(i, *extra):
        return [sys.executable, str(WORKER), "--process_id", str(i), "--num_processes", "2", "--port", str(port),
                "--init", str(tmp_path / "init.npz"), "--out", str(tmp_path / f"process{i}.npz"),
                "--checkpoint_dir", str(checkpoints), *extra]

    logs = [tmp_path / f"killed{i}.log" for i in range(2)]
    heartbeat = ["--heartbeat_timeout_s", str(HEARTBEAT_TIMEOUT_S)]
    with open(logs[0], "w") as log0, open(logs[1], "w") as log1:
        survivor = subprocess.Popen(command(0, *heartbeat), env=_worker_env(), stdout=log0,
                                    stderr=subprocess.STDOUT)
        victim = subprocess.Popen(command(1, *heartbeat, "--die_after_step", "1"), env=_worker_env(),
                                  stdout=log1, stderr=subprocess.STDOUT)
    try:
        assert victim.wait(timeout=240) == -signal.SIGKILL, logs[1].read_text()[-3000:]
        died = time.monotonic()
        survivor.wait(timeout=HEARTBEAT_TIMEOUT_S + 60)
        stopped_after = time.monotonic() - died
    finally:
        for proc in (survivor, victim):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert survivor.returncode != 0 and stopped_after < HEARTBEAT_TIMEOUT_S + 60
    log = logs[0].read_text()
    assert "lost another process of this run" in log or "another task died" in log, log[-3000:]
    assert Checkpointer(checkpoints, keep=2).all_steps() == [1]

    port = _free_port()
    _run_processes([command(i) for i in range(2)], [tmp_path / f"rerun{i}.log" for i in range(2)])
    ref_params, ref_losses, ref_logprobs = worker.train_one_device(host_params)
    for i in range(2):
        got = np.load(tmp_path / f"process{i}.npz")
        assert int(got["first_step"]) == 2  # resumed after the checkpoint of step 1
        np.testing.assert_allclose(got["losses"], ref_losses[1:], rtol=1e-5)
        np.testing.assert_allclose(got["logprobs"], ref_logprobs, atol=1e-5, rtol=1e-5)
        for j, want in enumerate(jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(got[f"param_{j}"], want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The command line


def parse(*args: str):
    """bond.main's parsing and validation, in this process: the config, or the UsageError / ConfigError."""
    cli.parse_command_line(["bond.main", f"--config={J_BOND}:quick", *args])
    config = cli.flags.FLAGS.config
    validate(config)
    return config


# Fields, their kind, and values their validation rejects (bond/validation.py).
NUMERIC_FIELDS = {
    "steps": ("int", [0, -3]),
    "batch_size": ("int", [0]),
    "log_every": ("int", [0]),
    "top_k": ("int", [-1]),
    "min_new_tokens": ("int", [-2]),
    "eval.every": ("int", [0]),
    "checkpoint.every": ("int", [0]),
    "checkpoint.keep": ("int", [0, 1]),
    "anchor.period": ("int", [0]),
    "model.num_layers": ("int", [0]),
    "algo.num_samples": ("int", [0]),  # a knob j_bond reads (each algorithm checks the knobs it reads)
    "learning_rate": ("float", [0.0, -1e-3, float("inf")]),
    "temperature": ("float", [0.0, -1.0]),
    "top_p": ("float", [0.0, 1.5]),
    "algo.beta": ("float", [-0.1, 1.5, float("nan")]),
    "algo.gamma": ("float", [-1.0]),
    "anchor.eta": ("float", [0.0, 2.0]),
}
FIELDS = set(cli._field_paths(load_config(f"{J_BOND}:quick")))
not_a_number = st.text(alphabet="abcxyz_-+:,", min_size=1, max_size=6)


@st.composite
def wrong_override(draw):
    """(field the message must name, the --config.<field>=<value> argument)."""
    kind = draw(st.sampled_from(["type", "range", "unknown"]))
    if kind == "unknown":
        name = draw(st.from_regex(r"[a-z]{3,10}(\.[a-z]{3,8})?", fullmatch=True))
        field = draw(st.sampled_from(sorted(NUMERIC_FIELDS)))
        prefix = field.rsplit(".", 1)[0] + "." if "." in field and draw(st.booleans()) else ""
        name = prefix + name
        assume(name not in FIELDS)
        return name, f"--config.{name}=1"
    field = draw(st.sampled_from(sorted(NUMERIC_FIELDS)))
    typ, bad = NUMERIC_FIELDS[field]
    if kind == "range":
        return field, f"--config.{field}={draw(st.sampled_from(bad))}"
    value = draw(not_a_number | (st.floats(0.1, 9.9).map(lambda x: f"{x:.2f}") if typ == "int" else not_a_number))
    return field, f"--config.{field}={value}"


@settings(max_examples=60, deadline=None)
@given(wrong_override())
def test_fault_wrong_override_values_name_the_field_without_a_traceback(override):
    field, arg = override
    with pytest.raises((cli.UsageError, ConfigError)) as error:  # these print one line and exit 2
        parse(arg)
    assert f"config.{field}" in str(error.value), (arg, str(error.value))


def test_fault_unknown_fields_name_the_closest_ones():
    with pytest.raises(cli.UsageError, match=r"no field config\.algo\.bta; did you mean --config\.algo\.beta"):
        parse("--config.algo.bta=0.3")
    with pytest.raises(cli.UsageError, match=r"did you mean --config\.steps\?"):
        parse("--config.stepz=3")
    assert parse("--config.algo.beta=0.25").algo.beta == 0.25  # and a right one still parses


def test_fault_cli_mistakes_end_in_one_line_and_exit_status_2(tmp_path):
    """The real command line, each mistake in its own process (all started at once)."""
    file = tmp_path / "file"
    file.write_text("")
    cases = {
        "misspelled field": ([f"--config={J_BOND}:quick", "--config.nonexistent=1"], "no field config.nonexistent"),
        "unknown variant": ([f"--config={J_BOND}:nosuchvariant"], "['lora', 'quick', 'synthetic']"),
        "missing config file": ([f"--config={ROOT / 'configs' / 'nope.py'}"], "there is no config file"),
        "bad type": ([f"--config={J_BOND}:quick", "--config.steps=abc"], "config.steps takes an int"),
        "unwritable workdir": ([f"--config={J_BOND}:quick", f"--workdir={file / 'run'}"], "cannot be written"),
    }
    env = {**os.environ, "XLA_FLAGS": xla_flags(), "JAX_PLATFORMS": "cpu"}
    procs = {
        name: subprocess.Popen([sys.executable, "-m", "bond.main", f"--workdir={tmp_path / name}", *args],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (args, _) in cases.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        last = err.strip().splitlines()[-1]
        assert proc.returncode == 2, (name, err[-2000:])
        assert cases[name][1] in last and "Traceback" not in err, (name, err[-2000:])
