"""The notebooks run top to bottom in their quick mode, and are committed without outputs.

Each notebook runs in a fresh Jupyter kernel (nbclient) with BOND_NOTEBOOK_QUICK=1 (the tiny
budget of tests/test_train.py's `tiny()`), BOND_NOTEBOOK_HEADLESS=1 (figures are saved, not
shown) and its runs, figures and caches under pytest's temporary folders, never in the repository.
The last line a notebook prints is its result as JSON; the tests check it. The reference cache
(BOND_CACHE) and JAX's persistent compilation cache are shared by the notebooks of one session,
so a notebook after the first reuses the pretrained reference and the compiled programs.
"""

import json
import math
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from conftest import xla_flags

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("01_best_of_n", "02_new_loss", "03_results")
CELL_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("notebook_cache")


def execute(name: str, workdir: Path, cache: Path) -> nbformat.NotebookNode:
    """Runs notebooks/<name>.ipynb top to bottom in quick, headless mode; returns it with its outputs.

    A cell that raises (or runs longer than CELL_TIMEOUT_S) stops the run with nbclient's
    CellExecutionError (or CellTimeoutError), which shows the cell and its traceback.
    """
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    env = {
        **os.environ,
        "BOND_NOTEBOOK_QUICK": "1",
        "BOND_NOTEBOOK_HEADLESS": "1",
        "BOND_NOTEBOOK_WORKDIR": str(workdir),
        "BOND_CACHE": str(cache),
        "JAX_COMPILATION_CACHE_DIR": str(cache / "jax_compilation"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "XLA_FLAGS": xla_flags(),  # one CPU device: conftest's eight fake devices are for the sharding tests
    }
    env.pop("BOND_NOTEBOOK_RUNS", None)
    client = NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    client.execute(env=env)
    return notebook


def final_result(notebook: nbformat.NotebookNode) -> dict:
    """The JSON object on the last line the notebook printed."""
    printed = [
        output["text"]
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream" and output.name == "stdout"
    ]
    assert printed, "the notebook printed nothing"
    return json.loads(printed[-1].strip().splitlines()[-1])


def assert_figures_written(result: dict, count: int) -> None:
    assert len(result["figures"]) == count
    for path in result["figures"]:
        assert Path(path).is_file() and Path(path).stat().st_size > 1000, path


def test_notebook_01_best_of_n_runs(tmp_path, shared_cache):
    notebook = execute("01_best_of_n", tmp_path, shared_cache)
    result = final_result(notebook)
    # Exact quantities: float32 round-off only.
    assert result["max_abs_bon_minus_enumeration"] < 1e-6
    assert result["max_abs_iterated_bo2_cubed_minus_bo8"] < 1e-6
    # 10,000 support points (largest mass ~1e-3): within 1e-3 of the continuous limits for N <= 64.
    assert result["max_abs_kl_minus_bound_continuous"] < 1e-3
    assert result["max_abs_win_rate_minus_limit_continuous"] < 1e-3
    assert result["max_kl_minus_bound_any"] < 1e-5  # KL <= bound, up to float32 round-off
    # Monte-Carlo mean of the log-quantile estimator against its exact mean (binomial sum), in
    # standard errors: 32 (k, level) cells from a fixed seed; 5 s.e. is far in the tail of each.
    assert result["max_mc_vs_exact_bias_z"] < 5.0
    assert_figures_written(result, 4)


def test_notebook_02_new_loss_trains_both(tmp_path, shared_cache):
    notebook = execute("02_new_loss", tmp_path, shared_cache)
    result = final_result(notebook)
    assert set(result["runs"]) == {"j_bond", "margin_j_bond"}
    for name, run in result["runs"].items():
        assert math.isfinite(run["final_eval_reward"]) and math.isfinite(run["final_train_reward"]), name
        assert run["final_kl_policy_ref"] > 0, name  # the policy moved from the reference
        assert run["steps"] == 20, name
    # With a vanishing margin the new loss is J-BOND's, in value and gradient, on the same inputs.
    assert result["small_margin_vs_j_bond"]["loss"] < 1e-6
    assert result["small_margin_vs_j_bond"]["gradient"] < 1e-6
    assert "config.algo.margin=0.0 must be > 0" in result["validation_message"]
    assert_figures_written(result, 1)


def test_notebook_03_results_loads_runs_and_plots(tmp_path, shared_cache):
    notebook = execute("03_results", tmp_path, shared_cache)
    result = final_result(notebook)
    assert len(result["runs"]) == 2
    for name, run in result["runs"].items():
        assert run["eval_points"] >= 2, name
        assert math.isfinite(run["final_eval_reward"]) and run["final_kl_policy_ref"] > 0, name
    assert 1 <= len(result["front"]) <= 2
    assert_figures_written(result, 2)


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_no_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    for cell in code_cells:
        assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip the outputs before committing"


def test_every_notebook_is_tested():
    assert sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)
