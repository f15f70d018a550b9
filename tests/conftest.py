"""Test setup: eight fake CPU devices, so sharding tests can build real meshes, compiles without
LLVM's optimizations, and one persistent compilation cache for the session.

The flags must be set before jax is first imported; unsharded computations still run on
device 0 exactly as on a one-device machine. Compiling dominates this suite's time. At the test
models' sizes (tiny programs) these flags cut the CPU time to compile a J-BOND train step from
14.6 s to 2.3 s and run it about as fast (jax 0.10.2): LLVM optimization level 0 (-> 6.6 s), XLA's
classic elemental emitters instead of its MLIR fusion emitters (-> 3.3 s), and one LLVM module per
program instead of several compiled in parallel (-> 2.3 s). Every comparison a test makes is
between programs compiled alike (the processes it launches inherit the flags). Many tests (and
the processes they launch) compile the same programs, so JAX's persistent compilation cache is
shared by the test workers and their subprocesses. It is keyed by the program and the compiler
flags, so a hit gives the program a miss would build.
"""

import os
import tempfile
from pathlib import Path

import pytest

# A jaxlib that no longer knows one of these flags stops at startup naming it ("Unknown flag in
# XLA_FLAGS"): drop that flag here.
COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
)


def xla_flags(devices: int = 1) -> str:
    """XLA_FLAGS for a process a test launches: `devices` CPU devices, compiled as the tests compile."""
    fake = f" --xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    return COMPILE_FLAGS + fake


if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "bond-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")


# Test files that run for minutes go first, so that under `pytest -n 2` (pytest.ini) the other
# worker works through the rest meanwhile instead of waiting for them at the end. (pytest.ini's
# --no-loadscope-reorder keeps this order: xdist otherwise sends files with the most tests first.)
LONG_RUNNING_FILES = ("test_experiments.py", "test_experiments_second_half.py", "test_train.py", "test_notebooks.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_RUNNING_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """The stage cache of the test files whose tiny reference is the same (population, sweep,
    test-time): one folder per worker, so the reference is pretrained once there. Files with
    another reference define their own `cache_dir`."""
    path = tmp_path_factory.getbasetemp() / "bond_cache_population_sweep"
    path.mkdir(exist_ok=True)
    return str(path)
