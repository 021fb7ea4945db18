"""The picture of a run: drawn from a real guarded run, written to TensorBoard when training ends, and by
``lr-guard replay --plot``; the guard trains without matplotlib."""

import math
import re
import sys
from pathlib import Path

import pytest
from conftest import make_trainer
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lr_guard import LRGuard, PlateauDetector
from lr_guard.events import Action
from lr_guard.plot import draw_record, save_figure
from lr_guard.replay import main
from lr_guard.run_record import RunRecord
from lr_guard.testing import ScriptedLossModule

PICTURE_TAG = "lr_guard/picture"


def script(n=120, nan_at=45, flat_from=70):
    """A falling loss, one NaN, then flat: a rollback, then a plateau cut."""
    values = [2.0 / (1.0 + 0.05 * t) for t in range(flat_from)] + [2.0 / (1.0 + 0.05 * flat_from)] * (n - flat_from)
    values[nan_at] = math.nan
    return values


def guarded_fit(logger=False, max_steps=120):
    plateau = PlateauDetector(patience=15, window=1, noise_sigmas=0.0, warmup_steps=0, threshold=1e-3)
    guard = LRGuard(
        gate=False, snapshot_every=10, confirm_steps=3, skip_batches=2, keep_lr_on_bad_batch=False, plateau=plateau
    )
    trainer = make_trainer([guard], max_steps=max_steps, logger=logger, log_every_n_steps=5)
    trainer.fit(ScriptedLossModule(script(), optimizer="adam", lr=0.01))
    return guard


def artists(figure, gid):
    found = []
    for ax in figure.axes:
        found += [a for a in ax.get_children() if a.get_gid() == gid]
    return found


def test_the_picture_of_a_real_run_marks_each_rollback_cut_and_skip(tmp_path):
    guard = guarded_fit(TensorBoardLogger(tmp_path, name="run", version=0))
    actions = [d.action for d in guard.decisions]
    assert actions.count(Action.ROLLBACK) == 1 and actions.count(Action.LR_CUT) >= 1
    figure = draw_record(guard._reporter.record, guard.decisions)

    rollback = next(d for d in guard.decisions if d.action == Action.ROLLBACK)
    (arrow,) = artists(figure, "lr_guard:rollback")
    assert arrow.xy[0] == rollback.rollback_to and arrow.xyann[0] == rollback.event.step  # back to the step restored
    assert len(artists(figure, "lr_guard:discarded")) == 1
    (cuts,) = artists(figure, "lr_guard:lr_cut")
    assert list(cuts.get_xdata()) == [d.event.step for d in guard.decisions if d.action == Action.LR_CUT]
    (ticks,) = artists(figure, "lr_guard:skip")
    assert list(ticks.get_xdata()) == [rollback.step, rollback.step + 1]  # the two updates skipped after it
    assert guard.counts["skipped_batches"] == 2
    (nan_marks,) = artists(figure, "lr_guard:non_finite")
    assert list(nan_marks.get_xdata()) == [45]
    lr_axis = figure.axes[1]
    assert lr_axis.get_yscale() == "log"
    assert min(lr_axis.lines[0].get_ydata()) < 0.01 * 0.4  # the rollback's and the plateau's cuts, beneath
    labels = [t.get_text() for t in figure.legends[0].get_texts()]
    assert "rollback: back to the step restored" in labels and "LR cut (factor)" in labels


def test_the_picture_is_written_to_tensorboard_when_training_ends(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    guard = guarded_fit(logger)
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert acc.Tags()["images"] == [PICTURE_TAG]
    (image,) = acc.Images(PICTURE_TAG)
    assert image.step == 120 and image.width > 500 and image.height > 300
    assert image.encoded_image_string.startswith(b"\x89PNG")
    assert len(guard._reporter.record) > 100  # every step of this short run is kept


def test_the_guard_trains_and_decides_without_matplotlib(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith(("matplotlib.", "lr_guard.plot"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    guard = guarded_fit(logger)
    assert [d.action for d in guard.decisions].count(Action.ROLLBACK) == 1
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert acc.Tags()["images"] == []
    assert len(guard._reporter.record) == 0  # nothing kept that cannot be drawn


def test_replay_plot_writes_the_replayed_run(tmp_path, capsys):
    log = tmp_path / "run.csv"
    values = script(n=300, nan_at=150, flat_from=400)
    log.write_text("step,loss,lr\n" + "".join(f"{t},{v},{0.01}\n" for t, v in enumerate(values)))
    out = tmp_path / "picture.svg"
    assert main(["replay", str(log), "--plot", str(out)]) == 0
    assert f"picture written to {out}" in capsys.readouterr().out
    text = out.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text


def test_replay_plot_refuses_an_unknown_extension_before_replaying(tmp_path, capsys):
    log = tmp_path / "run.csv"
    log.write_text("step,loss\n0,1.0\n1,0.9\n")
    assert main(["replay", str(log), "--plot", str(tmp_path / "picture.jpg")]) == 2
    err = capsys.readouterr().err
    assert "--plot" in err and "png, svg, pdf" in err and "picture.jpg" in err


def test_replay_plot_without_matplotlib_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith(("matplotlib.", "lr_guard.plot"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    log = tmp_path / "run.csv"
    log.write_text("step,loss\n0,1.0\n1,0.9\n")
    assert main(["replay", str(log), "--plot", str(tmp_path / "p.png")]) == 2
    assert "pip install 'lr_guard[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_a_long_run_is_kept_in_bounded_memory_and_its_spikes_stay_visible(tmp_path):
    record = RunRecord(capacity=512)
    for step in range(100_000):
        record.add(step, 50.0 if step == 61_234 else 1.0 + 1.0 / (1 + step), lr=1e-3)
    assert len(record) <= 512 and record.stride == 256
    assert max(record.highs) == 50.0 and min(record.lows) > 1.0
    figure = draw_record(record, [])
    assert save_figure(figure, tmp_path / "long.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="capacity must be an integer >= 2, got 1"):
        RunRecord(capacity=1)


def test_the_readme_picture_is_made_by_the_command_beside_it(tmp_path, capsys):
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    command = re.search(r"`lr-guard (replay \S+ --plot (docs/\S+\.png))`", readme)
    assert command is not None, "the README shows the command that makes its picture"
    args, picture = command.group(1).split(), command.group(2)
    assert f"]({picture})" in readme  # the picture shown is the one the command writes
    committed = root / picture
    assert committed.stat().st_size < 150_000
    out = tmp_path / "picture.png"
    args[args.index(picture)] = str(out)
    args[1] = str(root / args[1])
    assert main(args) == 0
    assert out.read_bytes().startswith(b"\x89PNG") and committed.read_bytes().startswith(b"\x89PNG")
