"""Two processes joined by jax.distributed train exactly like one process.

The first test launches tests/distributed_worker.py twice (two fake CPU devices each, gloo
collectives, a coordinator on a free localhost port) and compares what each process gathers
after a few Adam steps with the same training run unsharded in this process. The second runs
the full runner, `python -m bond.main --distributed`, in two such processes (one 4-device mesh),
stops it and resumes it from its checkpoint, and compares its metrics.jsonl with the same config
run in this process on 4 devices. A hang fails a test after TIMEOUT_S instead of blocking the suite.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

import distributed_worker as worker
from bond import train
from bond.config_base import load_config, set_field
from bond.metrics import read_metrics
from conftest import xla_flags

WORKER = Path(__file__).with_name("distributed_worker.py")
NUM_PROCESSES = 2
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env() -> dict[str, str]:
    return dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu",
                JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")


def _run_processes(commands: list[list[str]], logs: list[Path], env: dict[str, str] | None = None) -> None:
    """Runs one process per command to completion; fails fast if one crashes, and after TIMEOUT_S if they hang."""
    procs = []
    for command, log_path in zip(commands, logs):
        with open(log_path, "w") as log:
            procs.append(subprocess.Popen(command, env={**_worker_env(), **(env or {})}, stdout=log,
                                          stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(proc.poll() is None for proc in procs):
            # A crashed process leaves the others waiting on collectives: stop at the first failure.
            if any(proc.returncode not in (None, 0) for proc in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, (
            f"process {i} exited with {proc.returncode} (negative: killed after a failure elsewhere or the "
            f"{TIMEOUT_S} s timeout):\n{logs[i].read_text()[-4000:]}"
        )


def _run_workers(init: Path, out_dir: Path) -> list[Path]:
    """Runs the distributed_worker processes; returns their output files."""
    port = _free_port()
    outputs = [out_dir / f"process{i}.npz" for i in range(NUM_PROCESSES)]
    commands = [
        [sys.executable, str(WORKER), "--process_id", str(i), "--num_processes", str(NUM_PROCESSES),
         "--port", str(port), "--init", str(init), "--out", str(outputs[i])]
        for i in range(NUM_PROCESSES)
    ]
    _run_processes(commands, [out_dir / f"process{i}.log" for i in range(NUM_PROCESSES)])
    return outputs


def test_two_processes_train_like_one(tmp_path):
    host_params = worker.random_params()
    worker.save_params(tmp_path / "init.npz", host_params)
    outputs = _run_workers(tmp_path / "init.npz", tmp_path)
    ref_params, ref_losses, ref_logprobs = worker.train_one_device(host_params)
    ref_leaves = jax.tree.leaves(ref_params)
    assert ref_losses[-1] < ref_losses[0]  # it trains
    for path in outputs:
        got = np.load(path)
        assert int(got["num_devices"]) == 4 and int(got["num_local_devices"]) == 2  # one 4-device mesh
        np.testing.assert_allclose(got["losses"], ref_losses, rtol=1e-5)
        # Row by row: each process loaded the rows the batch sharding gave it.
        np.testing.assert_allclose(got["logprobs"], ref_logprobs, atol=1e-5, rtol=1e-5)
        for i, want in enumerate(ref_leaves):
            np.testing.assert_allclose(got[f"param_{i}"], want, atol=1e-5, rtol=1e-5)


# The runner test's config: configs/j_bond.py:quick shrunk to seconds (a 20-step reference, 3 steps).
RUNNER_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "j_bond.py"
RUNNER_OVERRIDES = {
    "model.num_layers": 1, "model.d_model": 16, "model.num_heads": 2, "model.d_ff": 32,
    "reference.steps": 20, "reference.corpus_size": 256, "reference.batch_size": 32,
    "batch_size": 8, "eval.every": 1, "eval.num_prompts": 2, "checkpoint.every": 2, "log_every": 1, "plots": False,
}
RUNNER_STEPS = 3


def _run_runner(workdir: Path, cache_dir: Path, steps: int) -> None:
    """`python -m bond.main --distributed` in NUM_PROCESSES processes of two devices each.

    A persistent compilation cache in `cache_dir` lets the resumed launch reuse the first one's programs."""
    port = _free_port()
    flags = [f"--config.{k}={v}" for k, v in {**RUNNER_OVERRIDES, "steps": steps, "cache_dir": cache_dir}.items()]
    commands = [
        [sys.executable, "-m", "bond.main", "--distributed", f"--coordinator=127.0.0.1:{port}",
         f"--num_processes={NUM_PROCESSES}", f"--process_id={i}", f"--config={RUNNER_CONFIG}:quick",
         f"--workdir={workdir}", *flags]
        for i in range(NUM_PROCESSES)
    ]
    compilation_cache = {
        "JAX_COMPILATION_CACHE_DIR": str(cache_dir / "jax"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    logs = [workdir.with_name(f"{workdir.name}-{steps}-process{i}.log") for i in range(NUM_PROCESSES)]
    _run_processes(commands, logs, env=compilation_cache)


def test_runner_on_two_processes_matches_one_process(tmp_path):
    """Two processes train 2 steps, stop, resume to step 3; their metrics equal one process's on the same 4 devices.

    Tolerance 1e-5: the same programs on the same mesh, only the collectives' transport differs
    (gloo between processes, in-process otherwise), so values agree up to float32 summation order
    (about 1e-6 seen on grad_norm)."""
    workdir, cache_dir = tmp_path / "two", tmp_path / "cache"
    _run_runner(workdir, cache_dir, steps=RUNNER_STEPS - 1)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]
    _run_runner(workdir, cache_dir, steps=RUNNER_STEPS)  # resumes from the checkpoint at step 2
    assert (workdir / "summary.json").exists() and (workdir / "checkpoints" / str(RUNNER_STEPS)).is_dir()

    config = load_config(f"{RUNNER_CONFIG}:quick")
    for key, value in {**RUNNER_OVERRIDES, "steps": RUNNER_STEPS, "cache_dir": str(cache_dir), "num_devices": 4}.items():
        set_field(config, key, value)
    train.run(config, tmp_path / "one", log=lambda _: None)

    two, one = read_metrics(workdir / "metrics.jsonl"), read_metrics(tmp_path / "one" / "metrics.jsonl")
    assert [row["step"] for row in two] == [row["step"] for row in one] == [0, 1, 1, 2, 2, 3, 3]  # train and eval rows
    for got, want in zip(two, one):
        assert got.keys() == want.keys()
        for key in want:
            if key.startswith(("eval/", "train/")):
                np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=f"{key} at step {want['step']}")
