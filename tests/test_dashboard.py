"""The dashboard as a person meets it: every Custom Scalars chart drawable, the guard's scalars at Lightning's own
steps, counters as step functions, the decisions as one table; and a real TensorBoard server reading a run."""

import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from conftest import make_trainer
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lr_guard import LRGuard
from lr_guard.diagnostics import DECISION_TABLE_TAG
from lr_guard.testing import ScriptedLossModule


def script_with_a_spike_a_nan_and_a_plateau(n=150):
    """Falls, spikes once at 30, turns NaN at 55 (a rollback), then sits flat (a plateau cut)."""
    script = [2.0 / (1.0 + 0.05 * t) if t < 80 else 2.0 / (1.0 + 0.05 * 80) for t in range(n)]
    script[30] *= 4.0
    script[55] = math.nan
    return script


@pytest.fixture(scope="module")
def guarded_run(tmp_path_factory):
    """A real Trainer with a TensorBoardLogger whose guard makes a rollback, an LR cut and sees a spike."""
    from lr_guard.detectors import PlateauDetector

    root = tmp_path_factory.mktemp("dashboard")
    logger = TensorBoardLogger(root, name="run", version=0)
    guard = LRGuard(
        gate=False,  # the NaN's update lands and is rolled back: the dashboard shows a rollback
        snapshot_every=10,
        confirm_steps=3,
        keep_lr_on_bad_batch=False,
        plateau=PlateauDetector(patience=20, window=5, noise_sigmas=0.0),
    )
    make_trainer([guard], max_steps=150, logger=logger, log_every_n_steps=5).fit(
        ScriptedLossModule(script_with_a_spike_a_nan_and_a_plateau(), optimizer="adam", lr=0.01)
    )
    actions = {str(d.action) for d in guard.decisions}
    kinds = {str(d.event.kind) for d in guard.decisions}
    assert {"rollback", "lr_cut"} <= actions and "spike" in kinds, (actions, kinds)
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return guard, acc, root


def chart_tags(acc):
    """Each Custom Scalars chart's title and the scalar tags it draws (regular expressions matched)."""
    [event] = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    scalar_tags = acc.Tags()["scalars"]
    charts = {}
    for category in layout.category:
        for chart in category.chart:
            if chart.HasField("margin"):
                patterns = [t for s in chart.margin.series for t in (s.value, s.lower, s.upper)]
            else:
                patterns = list(chart.multiline.tag)
            charts[chart.title] = sorted({t for p in patterns for t in scalar_tags if re.fullmatch(p, t)})
    return charts


def test_every_chart_has_data_and_its_tags_share_their_steps(guarded_run):
    _, acc, _ = guarded_run
    charts = chart_tags(acc)
    assert "loss trend, with the band up to the spike alarm level" in charts
    for title, tags in charts.items():
        assert tags, f"chart {title!r} has no data"
        steps = {tag: [e.step for e in acc.Scalars(tag)] for tag in tags}
        first = steps[tags[0]]
        assert first, f"chart {title!r}: {tags[0]} has no points"
        for tag in tags[1:]:
            assert steps[tag] == first, f"chart {title!r}: {tag} at {steps[tag][:5]}… but {tags[0]} at {first[:5]}…"


def test_the_guards_scalars_sit_at_lightnings_steps(guarded_run):
    _, acc, _ = guarded_run
    lightning = {e.step for e in acc.Scalars("train_loss")}
    guard = {e.step for e in acc.Scalars("lr_guard/lr/opt0_group0")}
    assert sorted(lightning)[:3] == [4, 9, 14]
    assert guard <= lightning and len(guard) >= len(lightning) - 2  # the last few steps are checked at the end


def test_counters_are_step_functions_logged_where_they_change(guarded_run):
    guard, acc, _ = guarded_run
    points = [(e.step, e.value) for e in acc.Scalars("lr_guard/count/rollbacks")]
    [rollback] = [d for d in guard.decisions if str(d.action) == "rollback"]
    at = rollback.event.step
    # flat from the start, straight up at the rollback's step (the value before and after), flat to the end
    assert points[0] == (0, 0.0)
    assert (at, 0.0) in points and (at, 1.0) in points
    assert points.index((at, 0.0)) + 1 == points.index((at, 1.0))
    assert points[-1][1] == 1.0 and points[-1][0] >= 140
    # every counter is logged at the same steps, and only where some counter changes: nothing between changes
    counters = [t for t in acc.Tags()["scalars"] if t.startswith("lr_guard/count/")]
    series = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in counters}
    assert {tuple(s for s, _ in v) for v in series.values()} == {tuple(s for s, _ in points)}
    for i in range(1, len(points) - 1, 2):
        assert points[i][0] == points[i + 1][0]  # the value before and the value after, at one step
        assert any(v[i][1] != v[i + 1][1] for v in series.values()), points[i]


def test_the_decisions_are_one_table_of_their_own(guarded_run):
    guard, acc, _ = guarded_run
    entries = acc.Tensors(f"{DECISION_TABLE_TAG}/text_summary")
    text = entries[-1].tensor_proto.string_val[0].decode()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| step")]
    assert len(rows) == len(guard.decisions)
    for row, decision in zip(rows, guard.decisions, strict=True):
        assert row.startswith(f"| {decision.event.step} |") and str(decision.action) in row


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base, route, **query):
    url = f"{base}{route}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_a_real_tensorboard_server_draws_every_chart(guarded_run):
    """TensorBoard itself, through its HTTP API: every Custom Scalars chart has data for each of its tags, with
    the same steps, and the Text tab has the decisions."""
    _, _, root = guarded_run
    port = _free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(root), "--port", str(port)]
    command += ["--host", "127.0.0.1", "--load_fast=false", "--reload_interval", "0"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                runs = _get(base, "/data/runs")
                if runs:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                error = server.stderr.read().decode()[-500:] if server.poll() is not None else "no answer in 15 s"
                pytest.skip(f"the TensorBoard server did not start: {error}")
            time.sleep(0.2)
        [run] = runs
        layout = _get(base, "/data/plugin/custom_scalars/layout")
        scalar_tags = _get(base, "/data/plugin/scalars/tags")[run]
        charts = [chart for category in layout["category"] for chart in category["chart"]]
        assert len(charts) >= 8
        for chart in charts:
            if "margin" in chart:
                series = chart["margin"]["series"]
                patterns = [t for s in series for t in (s["value"], s["lower"], s["upper"])]
            else:
                patterns = chart["multiline"]["tag"]
            tags = sorted({t for p in patterns for t in scalar_tags if re.fullmatch(p, t)})
            assert tags, f"chart {chart['title']!r} has no data"
            steps = {t: [p[1] for p in _get(base, "/data/plugin/scalars/scalars", tag=t, run=run)] for t in tags}
            for tag in tags:
                assert steps[tag], f"chart {chart['title']!r}: no points for {tag}"
                assert steps[tag] == steps[tags[0]], f"chart {chart['title']!r}: {tag} and {tags[0]} differ in steps"
        text_tags = _get(base, "/data/plugin/text/tags")[run]
        table_tag = f"{DECISION_TABLE_TAG}/text_summary"  # torch's add_text names its tag so
        assert table_tag in text_tags
        [table] = _get(base, "/data/plugin/text/text", run=run, tag=table_tag)[-1:]
        assert "rollback" in table["text"] and "lr_cut" in table["text"]
    finally:
        server.terminate()
        server.wait(timeout=10)
