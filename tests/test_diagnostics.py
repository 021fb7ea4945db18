"""Diagnostics read back from real TensorBoard event files with tensorboard's own event reader."""

import math
import warnings

import pytest
from conftest import make_trainer
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lr_guard import LRGuard
from lr_guard.diagnostics import CONFIG_TAG, DECISIONS_TAG
from lr_guard.testing import ScriptedLossModule


def decaying(n=200, nan_at=()):
    script = [2.0 / (1.0 + 0.05 * t) for t in range(n)]
    for t in nan_at:
        script[t] = math.nan
    return script


def read_events(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def text_entries(acc, tag):
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(f"{tag}/text_summary")]


@pytest.fixture
def guarded_run(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    guard = LRGuard(gate=False, snapshot_every=10, confirm_steps=3, skip_batches=2, keep_lr_on_bad_batch=False)
    script = decaying(nan_at=[45])
    make_trainer([guard], max_steps=80, logger=logger, log_every_n_steps=5).fit(
        ScriptedLossModule(script, optimizer="adam", lr=0.01)
    )
    return guard, read_events(logger.log_dir), script


def test_scalars_are_logged_at_the_logging_cadence(guarded_run):
    _, acc, script = guarded_run
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "lr_guard/loss/raw",
        "lr_guard/loss/trend",
        "lr_guard/loss/spike_level",
        "lr_guard/spike/score",
        "lr_guard/spike/threshold",
        "lr_guard/oscillation/threshold",
        "lr_guard/plateau/bad_steps",
        "lr_guard/plateau/patience",
        "lr_guard/divergence/score",
        "lr_guard/divergence/threshold",
        "lr_guard/lr/opt0_group0",
        "lr_guard/lr_factor/opt0_group0",
        "lr_guard/count/rollbacks",
        "lr_guard/count/skipped_batches",
        "lr_guard/count/lr_cuts",
        "lr_guard/count/spike",
    ):
        assert tag in tags, tag
    raw = {e.step: e.value for e in acc.Scalars("lr_guard/loss/raw")}
    assert sorted(raw)[:4] == [4, 9, 14, 19] and all((s + 1) % 5 == 0 for s in raw)  # Lightning's steps
    assert {e.step for e in acc.Scalars("train_loss")} >= set(raw)
    for step, value in raw.items():
        assert value == pytest.approx(script[step], rel=1e-6)
    thresholds = [e.value for e in acc.Scalars("lr_guard/spike/threshold")]
    assert set(thresholds) == {8.0, 64.0} and thresholds[-1] == 8.0  # at its cap until the noise's tail is read
    factor = {e.step: e.value for e in acc.Scalars("lr_guard/lr_factor/opt0_group0")}
    assert factor[44] == 1.0 and factor[49] == 0.5
    rollbacks = [(e.step, e.value) for e in acc.Scalars("lr_guard/count/rollbacks")]
    assert (45, 0.0) in rollbacks and (45, 1.0) in rollbacks  # the step it changed at: before and after


def test_every_decision_is_a_markdown_text_entry_at_its_step(guarded_run):
    _, acc, _ = guarded_run
    [(step, text)] = text_entries(acc, DECISIONS_TAG)
    assert step == 45
    assert "**step 45: divergence → rollback**" in text
    assert "rolled back to step 40, skipping the next 2 batches; lr 0.01 → 0.005" in text
    assert "| why | step 45: loss is nan (non-finite) |" in text and "1 rollbacks" in text


def test_configuration_is_recorded_once(guarded_run):
    _, acc, _ = guarded_run
    [(step, text)] = text_entries(acc, CONFIG_TAG)
    assert step == 0 and "| `skip_batches` | `2` |" in text and "SpikeDetector(threshold=8.0" in text


def test_custom_scalars_layout_gives_the_guard_a_dashboard(guarded_run):
    _, acc, _ = guarded_run
    [event] = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    [category] = layout.category
    assert category.title == "lr_guard"
    charts = {chart.title: chart for chart in category.chart}
    assert list(charts["spike score vs threshold"].multiline.tag) == [
        "lr_guard/spike/score",
        "lr_guard/spike/threshold",
    ]
    margin = charts["loss trend, with the band up to the spike alarm level"].margin.series[0]
    assert (margin.value, margin.upper) == ("lr_guard/loss/trend", "lr_guard/loss/spike_level")
    assert list(charts["learning rates"].multiline.tag) == [r"lr_guard/lr/.*"]


def test_csv_and_several_loggers_get_the_scalars(tmp_path):
    csv = CSVLogger(tmp_path, name="csv", version=0)
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    guard = LRGuard(snapshot_every=10, confirm_steps=3)
    make_trainer([guard], max_steps=40, logger=[csv, tb], log_every_n_steps=10).fit(
        ScriptedLossModule(decaying(nan_at=[25]), optimizer="adam")
    )
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "lr_guard/loss/raw" in header and "lr_guard/count/rollbacks" in header
    assert text_entries(read_events(tb.log_dir), DECISIONS_TAG)[0][0] == 25


def test_no_logger_warns_once_and_trains():
    guard = LRGuard()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([guard], max_steps=10).fit(ScriptedLossModule(decaying()))
        make_trainer([guard], max_steps=20).fit(ScriptedLossModule(decaying()))
    assert len([w for w in caught if "has no logger" in str(w.message)]) == 1


def test_diagnostics_can_be_switched_off(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="off", version=0)
    make_trainer([LRGuard(diagnostics=False)], max_steps=20, logger=logger).fit(ScriptedLossModule(decaying()))
    assert not [t for t in read_events(logger.log_dir).Tags()["scalars"] if t.startswith("lr_guard/")]
    with pytest.raises(ValueError, match="log_every_n_steps must be >= 1, got 0"):
        LRGuard(log_every_n_steps=0)


def raw_events(log_dir):
    """Every event in a run's event files, in order (tensorboard's own reader, without the accumulator)."""
    from pathlib import Path

    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event

    paths = sorted(Path(log_dir).glob("events.out.tfevents.*"))
    return [Event.FromString(record) for path in paths for record in RawEventFileLoader(str(path)).Load()]


def test_a_tensorboard_logger_gets_each_steps_scalars_as_one_event(guarded_run, tmp_path):
    _, acc, script = guarded_run
    logged = [e for e in raw_events(acc.path) if e.summary.value and e.summary.value[0].tag == "lr_guard/loss/raw"]
    assert [e.step for e in logged][:3] == [4, 9, 14]
    tags = [v.tag for v in logged[0].summary.value]
    assert len(set(tags)) == len(tags) >= 10 and tags[:2] == ["lr_guard/loss/raw", "lr_guard/loss/trend"]
    assert logged[0].summary.value[0].simple_value == pytest.approx(script[logged[0].step], rel=1e-6)
    # what Lightning's log_metrics writes (one event a scalar) reads back the same through the event reader
    from pytorch_lightning.loggers import TensorBoardLogger as Logger

    reference = Logger(tmp_path, name="reference", version=0)
    reference.log_metrics({v.tag: v.simple_value for v in logged[0].summary.value}, step=logged[0].step)
    reference.experiment.flush()
    ref = read_events(reference.log_dir)
    for tag in tags:
        assert [(e.step, e.value) for e in ref.Scalars(tag)] == [(e.step, e.value) for e in acc.Scalars(tag)][:1]


def test_a_tensorboard_loggers_prefix_is_kept_and_an_overridden_log_metrics_is_called(tmp_path):
    prefixed = TensorBoardLogger(tmp_path, name="prefixed", version=0, prefix="train")
    calls = []

    class Counting(TensorBoardLogger):
        def log_metrics(self, metrics, step=None):
            if "lr_guard/loss/raw" in metrics:
                calls.append(step)
            super().log_metrics(metrics, step)

    counting = Counting(tmp_path, name="counting", version=0)
    make_trainer([LRGuard()], max_steps=20, logger=[prefixed, counting], log_every_n_steps=10).fit(
        ScriptedLossModule(decaying())
    )
    tags = read_events(prefixed.log_dir).Tags()["scalars"]
    assert "train-lr_guard/loss/raw" in tags and "lr_guard/loss/raw" not in tags
    assert calls[:2] == [9, 19]  # the subclass's own log_metrics, at the guard's cadence
    assert "lr_guard/loss/raw" in read_events(counting.log_dir).Tags()["scalars"]


def test_a_closed_tensorboard_writer_falls_back_to_log_metrics(tmp_path):
    from lr_guard.diagnostics import one_event_writer, write_one_event

    logger = TensorBoardLogger(tmp_path, name="closed", version=0)
    writer = one_event_writer(logger)
    assert writer is logger.experiment and one_event_writer(CSVLogger(tmp_path)) is None
    from lightning.pytorch.loggers import TensorBoardLogger as LightningLogger

    other = LightningLogger(tmp_path, name="lightning")
    assert one_event_writer(other) is other.experiment  # the lightning namespace's logger too
    writer.close()  # torch drops its file writer; add_scalar would open a new one
    assert not write_one_event(logger, writer, {"a": 1.0}, 0)
    logger.log_metrics({"a": 1.0}, step=0)
    writer.flush()
    assert [e.value for e in read_events(logger.log_dir).Scalars("a")] == [1.0]
