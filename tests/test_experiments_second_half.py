"""The second half of the experiments' quick modes (see tests/test_experiments.py), in its own
file so that the suite's other worker runs it."""

from pathlib import Path

import pytest

from test_experiments import SECOND_HALF, check_records, run_quick


@pytest.fixture(scope="module")
def quick_second_half(tmp_path_factory) -> Path:
    return run_quick(tmp_path_factory.mktemp("experiments"), SECOND_HALF)


@pytest.mark.parametrize("name", SECOND_HALF)
def test_experiment_quick_record_passes_its_checks(quick_second_half, name):
    check_records(quick_second_half, (name,))
