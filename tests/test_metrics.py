"""Metrics: the JSON-lines file and its truncation on resume, TensorBoard events, W&B, progress, NaN stops."""

import glob
import io
import math
import struct
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from bond.config_base import base_config
from bond.metrics import (
    METRICS_FILENAME,
    WANDB_ID_FILENAME,
    MetricWriter,
    NonFiniteLossError,
    Progress,
    check_finite,
    format_duration,
    read_metrics,
)
from bond.validation import ConfigError, validate


def _metrics_of_step(t):
    """Deterministic metrics of step t, of the types a training loop hands over."""
    return {"loss": jnp.float32(1.0 / t), "kl": np.float64(t / 3.0), "count": t}


def _read_events(workdir):
    """(file index, step, tag, value or event kind) of every event, file by file.

    An event file is a sequence of records: uint64 length, uint32 crc, payload, uint32 crc.
    """
    events = []
    for index, path in enumerate(sorted(glob.glob(str(workdir / "events.out.tfevents.*")))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            if event.HasField("summary"):
                events += [(index, event.step, v.tag, v.simple_value) for v in event.summary.value]
            elif event.HasField("session_log"):
                events.append((index, event.step, "session_log", event.session_log.status))
    return events


def test_write_appends_exact_floats_one_line_per_step(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False) as writer:
        writer.write(1, _metrics_of_step(1))
        writer.write(2, _metrics_of_step(2))
        # Each line is on disk as soon as it is written.
        assert len(read_metrics(tmp_path / METRICS_FILENAME)) == 2
    records = read_metrics(tmp_path / METRICS_FILENAME)
    assert records == [
        {"step": 1, "loss": 1.0, "kl": 1 / 3, "count": 1.0},
        {"step": 2, "loss": float(np.float32(0.5)), "kl": 2 / 3, "count": 2.0},
    ]
    assert all(type(value) is float for record in records for name, value in record.items() if name != "step")


def test_write_rejects_non_scalars_and_a_step_metric(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(ValueError, match=r"'loss' has shape \(2,\)"):
            writer.write(1, {"loss": jnp.zeros(2)})
        with pytest.raises(ValueError, match="reserved"):
            writer.write(1, {"step": 3.0})
        with pytest.raises(ValueError, match="step must be an integer"):
            writer.write(1.5, {"loss": 1.0})


def test_truncate_after_resume_gives_the_uninterrupted_file(tmp_path):
    uninterrupted, crashed = tmp_path / "uninterrupted", tmp_path / "crashed"
    with MetricWriter(uninterrupted, tensorboard=False) as writer:
        for t in range(1, 11):
            writer.write(t, _metrics_of_step(t))
    # The crashed run got to step 8 and was killed while writing step 9's line; its newest
    # checkpoint is step 6.
    with MetricWriter(crashed, tensorboard=False) as writer:
        for t in range(1, 9):
            writer.write(t, _metrics_of_step(t))
    with open(crashed / METRICS_FILENAME, "a") as f:
        f.write('{"step": 9, "loss": 0.11')
    assert [r["step"] for r in read_metrics(crashed / METRICS_FILENAME)] == list(range(1, 9))

    with MetricWriter(crashed, tensorboard=False) as writer:
        writer.truncate_after(6)
        assert [r["step"] for r in read_metrics(crashed / METRICS_FILENAME)] == list(range(1, 7))
        for t in range(7, 11):
            writer.write(t, _metrics_of_step(t))
    assert (crashed / METRICS_FILENAME).read_bytes() == (uninterrupted / METRICS_FILENAME).read_bytes()


def test_truncate_after_minus_one_empties_the_file_of_a_run_without_checkpoints(tmp_path):
    """A run killed before its first checkpoint wrote its step-0 evaluation; the rerun starts fresh
    and evaluates step 0 again, so nothing of the first attempt may stay (no duplicate step 0)."""
    with MetricWriter(tmp_path, tensorboard=False) as writer:
        writer.write(0, {"eval/reward": 0.5})
        writer.write(1, {"loss": 1.0})
        writer.truncate_after(-1)
        writer.write(0, {"eval/reward": 0.5})
        writer.write(1, {"loss": 2.0})
    assert read_metrics(tmp_path / METRICS_FILENAME) == [{"step": 0, "eval/reward": 0.5}, {"step": 1, "loss": 2.0}]


def test_read_metrics_names_a_corrupt_line_and_a_missing_file(tmp_path):
    path = tmp_path / METRICS_FILENAME
    path.write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        read_metrics(tmp_path / "nothing.jsonl")


def test_tensorboard_events_hold_the_scalars_and_a_resume_purges_later_steps(tmp_path):
    with MetricWriter(tmp_path) as writer:
        for t in (1, 2, 3):
            writer.write(t, {"loss": float(t) / 4})
    with MetricWriter(tmp_path) as writer:  # resumed from the checkpoint at step 2
        writer.truncate_after(2)
        writer.write(3, {"loss": 0.5})
    assert _read_events(tmp_path) == [
        (0, 1, "loss", 0.25),
        (0, 2, "loss", 0.5),
        (0, 3, "loss", 0.75),
        # TensorBoard hides the events of steps >= 3 of earlier files when it sees this start.
        (1, 3, "session_log", event_pb2.SessionLog.START),
        (1, 3, "loss", 0.5),
    ]


def test_missing_tensorboardx_warns_once_and_still_writes_json(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # makes the import raise ImportError
    with pytest.warns(UserWarning, match="tensorboardX") as warned:
        with MetricWriter(tmp_path) as writer:
            writer.write(1, {"loss": 1.0})
            writer.write(2, {"loss": 2.0})
    assert len(warned) == 1
    assert [r["loss"] for r in read_metrics(tmp_path / METRICS_FILENAME)] == [1.0, 2.0]
    assert not glob.glob(str(tmp_path / "events.out.tfevents.*"))


# ---------------------------------------------------------------------------------------------
# Weights & Biases, through a stand-in `wandb` module (nothing installed, no network)


class _FakeRun:
    def __init__(self, **init_kwargs):
        self.init_kwargs = init_kwargs
        self.logged = []  # (step, {name: value}) per log call
        self.finished = False

    def log(self, data, step=None):
        self.logged.append((step, dict(data)))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.runs = []

    def init(**kwargs):
        module.runs.append(_FakeRun(**kwargs))
        return module.runs[-1]

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def _wandb_config(**wandb):
    c = base_config()
    c.wandb.update(wandb)
    return c


def test_wandb_run_receives_the_scalars_of_metrics_jsonl_per_step(tmp_path, fake_wandb):
    config = _wandb_config(project="bond-tests", mode="offline")
    with MetricWriter.for_run(tmp_path / "run", config) as writer:
        for t in (1, 2, 3):
            writer.write(t, _metrics_of_step(t))
        writer.write(3, {"eval/reward": 0.5})  # a second write of a step, as train.run's evaluation does
    (run,) = fake_wandb.runs
    rows = read_metrics(tmp_path / "run" / METRICS_FILENAME)
    assert run.logged == [(row.pop("step"), row) for row in rows]
    assert run.finished
    kwargs = run.init_kwargs
    assert (kwargs["project"], kwargs["entity"], kwargs["mode"], kwargs["name"]) == ("bond-tests", None, "offline", "run")
    assert kwargs["config"] == config.to_dict() and kwargs["dir"] == str(tmp_path / "run")

    # A resumed run (a new writer in the same folder) continues the same W&B run.
    with MetricWriter.for_run(tmp_path / "run", config) as writer:
        writer.write(4, {"loss": 0.25})
    assert fake_wandb.runs[1].init_kwargs["id"] == kwargs["id"]
    assert kwargs["resume"] == "allow" and (tmp_path / "run" / WANDB_ID_FILENAME).read_text().strip() == kwargs["id"]
    assert fake_wandb.runs[1].logged == [(4, {"loss": 0.25})]


def test_wandb_off_by_default_never_imports_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any import of wandb would raise ImportError
    config = base_config()
    assert config.wandb.project == ""
    validate(config)
    with MetricWriter.for_run(tmp_path, config) as writer:
        writer.write(1, {"loss": 1.0})
    assert read_metrics(tmp_path / METRICS_FILENAME) == [{"step": 1, "loss": 1.0}]
    assert not (tmp_path / WANDB_ID_FILENAME).exists()


def test_wandb_on_without_wandb_installed_names_the_field_and_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    config = _wandb_config(project="bond-tests")
    with pytest.raises(ConfigError, match=r"config\.wandb\.project='bond-tests'.*pip install -e \"\.\[wandb\]\""):
        validate(config)
    with pytest.raises(ValueError, match=r"pip install -e \"\.\[wandb\]\""):
        MetricWriter.for_run(tmp_path, config)


def test_wandb_mode_must_be_one_wandb_knows(fake_wandb):
    with pytest.raises(ConfigError, match=r"config\.wandb\.mode='ofline'.*'offline'"):
        validate(_wandb_config(project="bond-tests", mode="ofline"))


# ---------------------------------------------------------------------------------------------
# Non-finite metrics


def test_check_finite_names_the_step_the_metrics_and_the_last_checkpoint():
    metrics = {"loss": jnp.float32(jnp.nan), "kl": 0.5, "logits": jnp.array([1.0, jnp.inf, -jnp.inf, 2.0])}
    with pytest.raises(NonFiniteLossError) as raised:
        check_finite(120, metrics, last_checkpoint_step=100)
    message = str(raised.value)
    assert "step 120" in message
    assert "loss=nan" in message and "logits (2 of 4 entries non-finite)" in message and "kl" not in message
    assert "last good checkpoint is step 100" in message
    assert (raised.value.step, raised.value.names, raised.value.last_checkpoint_step) == (120, ("loss", "logits"), 100)

    with pytest.raises(NonFiniteLossError, match=r"step 3: loss=inf\..*No checkpoint was saved yet"):
        check_finite(3, {"loss": np.inf}, last_checkpoint_step=None)


def test_check_finite_passes_finite_metrics():
    check_finite(5, {"loss": jnp.float32(3.0), "count": 2, "values": jnp.ones(3)}, last_checkpoint_step=None)


# ---------------------------------------------------------------------------------------------
# Progress


class _FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_format_duration():
    assert [format_duration(s) for s in (0, 12.4, 65, 3600, 3723.6)] == ["0s", "12s", "1m05s", "1h00m00s", "1h02m04s"]


def test_progress_prints_full_lines_rate_limited_with_smoothed_rate_and_eta():
    clock, stream = _FakeClock(), io.StringIO()
    progress = Progress(100, every_seconds=10, show=("loss", "kl"), smoothing=0.3, stream=stream, clock=clock)
    progress.update(1, {"loss": jnp.float32(0.5), "other": 1.0})  # the first update prints
    clock.now = 5.0
    progress.update(6, {"loss": 0.4})  # 5 s after the last line: skipped
    clock.now = 10.0
    progress.update(11, {"loss": 0.25, "kl": 1.0})  # 10 steps in 10 s: rate 1
    clock.now = 20.0
    progress.update(31, {"loss": 0.125, "kl": 2.0})  # window rate 2: 0.3 * 2 + 0.7 * 1 = 1.3
    clock.now = 21.0
    progress.update(100, {"loss": 0.0625})  # the last step always prints: 0.3 * 69 + 0.7 * 1.3 = 21.61
    assert stream.getvalue() == (
        "step 1/100 (1.0%) | -- steps/s | ETA -- | loss 0.5\n"
        "step 11/100 (11.0%) | 1 steps/s | ETA 1m29s | loss 0.25 | kl 1\n"
        "step 31/100 (31.0%) | 1.3 steps/s | ETA 53s | loss 0.125 | kl 2\n"  # 69 / 1.3 = 53.08 s
        "step 100/100 (100.0%) | 21.6 steps/s | ETA 0s | loss 0.0625\n"
    )
    assert math.isclose(progress.steps_per_second, 21.61)


def test_progress_on_a_terminal_redraws_one_line():
    clock, stream = _FakeClock(), _Terminal()
    progress = Progress(20, every_seconds=1, show=(), stream=stream, clock=clock)
    progress.update(10)
    clock.now = 2.0
    progress.update(20)
    first = "step 10/20 (50.0%) | -- steps/s | ETA --"
    assert stream.getvalue() == "\r" + first + "\r" + "step 20/20 (100.0%) | 5 steps/s | ETA 0s".ljust(len(first)) + "\n"


def test_progress_rejects_bad_arguments():
    with pytest.raises(ValueError, match="total_steps"):
        Progress(0)
    with pytest.raises(ValueError, match="smoothing"):
        Progress(10, smoothing=0.0)
