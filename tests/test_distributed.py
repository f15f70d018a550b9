"""Two processes joined by jax.distributed train exactly like one process.

The test launches tests/distributed_worker.py twice (two fake CPU devices each, gloo
collectives, a coordinator on a free localhost port) and compares what each process gathers
after a few Adam steps with the same training run unsharded in this process. A hang fails the
test after TIMEOUT_S instead of blocking the suite.
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

WORKER = Path(__file__).with_name("distributed_worker.py")
NUM_PROCESSES = 2
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(init: Path, out_dir: Path) -> list[Path]:
    """Runs the workers to completion; fails fast if one crashes, and after TIMEOUT_S if they hang."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    port = _free_port()
    outputs = [out_dir / f"process{i}.npz" for i in range(NUM_PROCESSES)]
    logs = [out_dir / f"process{i}.log" for i in range(NUM_PROCESSES)]
    procs = []
    for i in range(NUM_PROCESSES):
        with open(logs[i], "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, str(WORKER), "--process_id", str(i), "--num_processes", str(NUM_PROCESSES),
                 "--port", str(port), "--init", str(init), "--out", str(outputs[i])],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            ))
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
