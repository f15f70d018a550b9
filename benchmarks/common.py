"""Helpers shared by the benchmark scripts: the workload, timing, memory, compile counts, matmul peak.

Every script prints JSON lines; the keys these helpers fill are described in benchmarks/README.md.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import resource
import statistics
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_WORKLOAD = Path(__file__).resolve().parents[1].parent / "shared" / "bench" / "workload.py"

# A few seconds in total: a tiny model, two prompts, a handful of tokens, one timed call.
SMOKE_OVERRIDES = {
    "model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_inner": 64, "vocab_size": 64, "n_positions": 16},
    "prompts": {"batch": 2, "length": 4, "high": 64},
    "sampling": {"n_per_prompt": 2, "max_new_tokens": 4, "min_new_tokens": 4},
    "update": {"prompts_per_step": 2, "completions_per_step": 4},
    "timing": {"generate_warmup_calls": 1, "generate_timed_calls": 1, "step_warmup_steps": 1, "step_timed_steps": 1},
}

# jax.monitoring events (jax/_src/dispatch.py) emitted once per traced, lowered and compiled program.
_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
_LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_events: list[tuple[str, float]] = []
_listening = False


def load_workload(path: Path = DEFAULT_WORKLOAD) -> ModuleType:
    """Import the shared workload definition (shared/bench/workload.py) from a file path."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"workload file not found: {path}; pass --workload /path/to/workload.py")
    spec = importlib.util.spec_from_file_location("bench_workload", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def workload_and_prompts(bench: ModuleType, smoke: bool = False) -> tuple[dict, np.ndarray]:
    """The workload dict and its (batch, length) prompt ids; with `smoke`, the tiny SMOKE_OVERRIDES variant.

    The smoke prompts are drawn like the real ones (numpy default_rng(seed).integers(low, high)) but carry no
    checksum: the smoke variant checks that a script runs, not what it measures.
    """
    if not smoke:
        return bench.WORKLOAD, bench.make_prompts(bench.WORKLOAD)
    workload = copy.deepcopy(bench.WORKLOAD)
    for section, values in SMOKE_OVERRIDES.items():
        workload[section].update(values)
    del workload["model"]["n_params"]  # the full model's count
    workload["name"] += "_smoke"
    p = workload["prompts"]
    prompts = np.random.default_rng(p["seed"]).integers(p["low"], p["high"], size=(p["batch"], p["length"]))
    return workload, prompts


def median_time(call: Callable[[], object], warmup: int, timed: int) -> tuple[float, list[float], float]:
    """Median wall time of `timed` calls after `warmup` calls, the wall times, and the median process CPU time.

    `call` must block until its result is ready (jax.block_until_ready). On a shared machine the process CPU
    time divided by the wall time is the number of cores the call actually got.
    """
    for _ in range(warmup):
        call()
    times, cpu_times = [], []
    for _ in range(timed):
        start, cpu_start = time.perf_counter(), time.process_time()
        call()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return statistics.median(times), times, statistics.median(cpu_times)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (getrusage's ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict:
    """The JSON keys that say where and under what load a line was measured."""
    return {
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "jax": jax.__version__,
    }


def _record_event(event: str, seconds: float, **_) -> None:
    if event in (_TRACE_EVENT, _LOWER_EVENT, _COMPILE_EVENT):
        _events.append((event, seconds))


class CompileLog:
    """Counts the programs XLA compiles while the block runs and the seconds spent tracing, lowering, compiling.

        with CompileLog() as log:
            step(...)
        log.compiles, log.seconds

    Built on jax.monitoring's duration events, so it sees every jit in the process (including ones that
    hit jax's in-memory cache miss for a new shape, dtype or static argument: each is one recompile).
    """

    def __enter__(self) -> "CompileLog":
        global _listening
        if not _listening:
            jax.monitoring.register_event_duration_secs_listener(_record_event)
            _listening = True
        self._start = len(_events)
        return self

    def __exit__(self, *exc) -> None:
        events = _events[self._start:]
        self.compiles = sum(1 for event, _ in events if event == _COMPILE_EVENT)
        self.seconds = sum(seconds for _, seconds in events)


def matmul_peak_gflops(size: int = 1024, reps: int = 20, calls: int = 5) -> tuple[float, float]:
    """The machine's float32 matmul peak as XLA reaches it: (GFLOP per wall second, GFLOP per CPU second).

    Best of `calls` runs of a jitted loop of `reps` products of [size, size] matrices (2·size³ FLOPs
    each), on XLA's default CPU threads (all cores). The per-CPU-second rate is the rate of one busy
    core; on a loaded machine it stays close to its quiet value while the wall rate drops.
    """
    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), jnp.float32) / np.sqrt(size)

    @jax.jit
    def chain(x):
        return jax.lax.fori_loop(0, reps, lambda _, y: jnp.dot(y, a), x)

    jax.block_until_ready(chain(a))
    best_wall = best_cpu = float("inf")
    for _ in range(calls):
        start, cpu_start = time.perf_counter(), time.process_time()
        jax.block_until_ready(chain(a))
        best_wall = min(best_wall, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - cpu_start)
    flops = 2 * size**3 * reps
    return flops / best_wall / 1e9, flops / best_cpu / 1e9
