"""bond.main's console: library logging stays quiet unless asked for; the summary names its KLs.

The logging test runs the real command line (absl's app.run and flag parsing, bond.main.main)
in a subprocess whose `train.run` is replaced by a stand-in that saves one orbax checkpoint and
prints one progress line: the same libraries log the same way as in a full run, in seconds.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bond.main import KL_LEGEND, format_summary
from conftest import xla_flags

ROOT = Path(__file__).resolve().parents[1]

# bond.main with train.run replaced: one orbax save (orbax logs INFO lines on every save) and one
# progress line (printed by bond.metrics.Progress, as the training loop prints them).
_MAIN_WITH_STAND_IN_RUN = """
import jax.numpy as jnp
from absl import app
from bond import main, train
from bond.checkpoint import Checkpointer
from bond.metrics import Progress

def run(config, workdir):
    with Checkpointer(workdir / "checkpoints", keep=2) as checkpointer:
        checkpointer.save(1, {"w": jnp.zeros(3)})
    Progress(1).update(1, {"loss": 0.5})
    return {}

train.run = run
app.run(main.main, flags_parser=main._parse_or_exit)
"""

# absl's log line prefix: severity letter, MMDD, time, thread id, file:line]
_ABSL_INFO_LINE = re.compile(r"^I\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]", re.MULTILINE)


def _run_main(tmp_path: Path, *flags: str) -> str:
    env = {**os.environ, "XLA_FLAGS": xla_flags(), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _MAIN_WITH_STAND_IN_RUN, f"--workdir={tmp_path / 'run'}",
         f"--config.cache_dir={tmp_path / 'cache'}", *flags],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_library_logging_is_quiet_by_default_and_verbosity_brings_it_back(tmp_path):
    quiet = _run_main(tmp_path / "quiet")
    assert "step 1/1 (100.0%)" in quiet
    assert not _ABSL_INFO_LINE.search(quiet), quiet
    assert "orbax" not in quiet.lower(), quiet

    verbose = _run_main(tmp_path / "verbose", "--verbosity=0")
    assert "step 1/1 (100.0%)" in verbose
    info_lines = _ABSL_INFO_LINE.findall(verbose)
    assert len(info_lines) >= 5 and "orbax" in verbose.lower()


@pytest.mark.parametrize("with_kl", [True, False])
def test_summary_names_the_kl_directions_under_the_table(with_kl):
    after = {"eval/reward": 1.0, **({"eval/kl_policy_bon4": 0.5, "eval/kl_bon4_policy": 0.25} if with_kl else {})}
    summary = {"algorithm": "j_bond", "task": "toy_language", "steps": 2, "before": after, "after": after}
    lines = format_summary(summary).splitlines()
    assert (lines[-1] == KL_LEGEND) == with_kl
    if with_kl:
        assert "kl_policy_bonN = KL(π‖π_BoN)" in KL_LEGEND and "kl_bonN_policy = KL(π_BoN‖π)" in KL_LEGEND
