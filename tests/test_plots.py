"""bond/plots.py: a run's figures, with and without the reference's exact trade-offs."""

import numpy as np
import pytest

from bond import exact, plots
from bond.metrics import MetricWriter

# Two prompts' π_ref and rewards (ties included): a real reference_front.json in miniature.
REF = np.array([[0.1, 0.2, 0.3, 0.15, 0.25], [0.4, 0.05, 0.3, 0.2, 0.05]])
REWARDS = np.array([[0.0, 1.0, 1.0, 2.0, 0.5], [1.0, 3.0, 0.0, 1.0, 2.0]])
ROWS = [
    {"step": 0, "eval/reward": 1.0, "eval/kl_policy_ref": 0.0},
    {"step": 5, "train/loss": 0.3},
    {"step": 10, "eval/reward": 1.2, "eval/kl_policy_ref": 0.1},
    {"step": 20, "eval/reward": 1.3, "eval/kl_policy_ref": 0.2},
]


@pytest.fixture
def reference():
    return exact.reference_front(REF, REWARDS, bon_ns=(2, 4))


def _run_folder(path, reference=None):
    with MetricWriter(path, tensorboard=False) as writer:
        for row in ROWS:
            writer.write(row["step"], {k: v for k, v in row.items() if k != "step"})
    plots.write_reference_front(path, reference)
    return path


def test_reference_front_file_round_trips_and_is_skipped_without_points(tmp_path, reference):
    assert plots.write_reference_front(tmp_path, None) is None
    assert plots.read_reference_front(tmp_path) is None
    path = plots.write_reference_front(tmp_path, reference)
    assert path == tmp_path / plots.REFERENCE_FRONT_FILENAME
    assert plots.read_reference_front(tmp_path) == reference


def test_reward_vs_kl_draws_best_of_n_points_and_the_front(reference):
    fig = plots.reward_vs_kl_figure(ROWS, reference)
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert {"N=2", "N=4"} <= set(texts) and {"0", "10", "20"} <= set(texts)
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_allclose(lines["best-of-N of π_ref"].get_xdata(), reference["bon"]["kl"])
    front = lines["KL-regularized front π_ref·exp(r/β)"]
    # The front is cut at the plot's right edge, a little past the largest BoN (or run) KL.
    right = ax.get_xlim()[1]
    assert max(reference["bon"]["kl"]) < right < max(reference["front"]["kl"])
    assert front.get_xdata()[-1] == pytest.approx(right)
    assert front.get_xdata()[0] == 0.0  # from π_ref itself
    np.testing.assert_allclose(front.get_ydata()[-1], np.interp(right, reference["front"]["kl"], reference["front"]["reward"]))

    plain = plots.reward_vs_kl_figure(ROWS).axes[0]
    assert [line.get_label() for line in plain.get_lines()] == ["this run"] and "N=2" not in [t.get_text() for t in plain.texts]


def test_plot_run_draws_the_reference_when_the_file_exists(tmp_path, reference):
    without = plots.plot_run(_run_folder(tmp_path / "without"))
    with_file = plots.plot_run(_run_folder(tmp_path / "with", reference))
    assert [p.name for p in without] == [p.name for p in with_file] == ["training.png", "reward_vs_kl.png"]
    assert without[1].read_bytes() != with_file[1].read_bytes()
    assert without[0].read_bytes() == with_file[0].read_bytes()  # the training curves do not read it
