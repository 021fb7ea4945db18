"""lr-guard replay on event files made by real Trainer runs, on CSVs, and its errors."""

import json
import math
import random

import pytest
from conftest import make_trainer
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.optim import lr_scheduler as S

from lr_guard import LRGuard
from lr_guard.actions import lr_factors
from lr_guard.actions.lr import lr_caps
from lr_guard.data import load_curve
from lr_guard.diagnostics import DECISIONS_TAG
from lr_guard.replay import ReplayError, guard_settings, load_series, main, replay
from lr_guard.testing import ScriptedLossModule


def script(n=120, nan_at=()):
    s = [2.0 / (1.0 + 0.05 * t) for t in range(n)]
    for t in nan_at:
        s[t] = math.nan
    return s


@pytest.fixture(scope="module")
def unguarded_run(tmp_path_factory):
    """A real run with a NaN at step 60 and no guard, logged to TensorBoard every step."""
    root = tmp_path_factory.mktemp("runs")
    logger = TensorBoardLogger(root, name="plain", version=0)
    make_trainer([], max_steps=100, logger=logger, log_every_n_steps=1).fit(
        ScriptedLossModule(script(nan_at=[60]), optimizer="adam", lr=0.01)
    )
    return root, logger.log_dir


def test_replay_of_a_real_run_says_what_the_guard_would_have_done(unguarded_run, capsys):
    _root, log_dir = unguarded_run
    assert main(["replay", log_dir, "--set", "snapshot_every=10", "--set", "confirm_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "100 values of 'train_loss'" in out
    # one NaN after a calm stretch: a bad batch (LR kept); the NaNs that follow cut it
    assert "      60  divergence" in out and "back to step 50, LR x1 (cumulative x1)" in out
    # 61..63 were checked in one batch with 60 (check_every_n_steps=8): the live guard drops them after the
    # rollback (they describe discarded weights), and so does the replay; 64 is the next value it sees
    assert "      61  divergence" not in out
    assert "      64  divergence" in out and "back to step 50, LR x0.5 (cumulative x0.5)" in out
    # the real run stayed NaN after step 60, so the guard would have retried, then stopped
    assert "stop" in out


def _streams():
    calm = script(n=400)
    return {
        "a NaN, then NaNs to the end": (script()[:60] + [math.nan] * 60, {"snapshot_every": 10, "confirm_steps": 3}),
        "two NaNs, skipped batches": (script(nan_at=[50, 58]), {"snapshot_every": 10, "skip_batches": 2}),
        "a blow-up that lasts": (calm[:70] + [50.0] * 10 + calm[80:120], {"snapshot_every": 10}),
        "a flat start (failed start), then plateaus": ([1.0 + 0.01 * math.sin(t) for t in range(400)], {}),
        "spikes skipped before their update": (
            [v * (8.0 if t in (90, 150) else 1.0) for t, v in enumerate(calm[:200])],
            {"skip_spikes": True, "snapshot_every": 20},
        ),
        "oscillation": ([1.0 + 0.3 * (t % 2) + 0.001 * t for t in range(300)], {"check_every_n_steps": 5}),
        "NaNs, 13 steps an epoch (checked at each epoch's end too)": (
            script()[:60] + [math.nan] * 60,
            {"snapshot_every": 10, "confirm_steps": 3},
        ),
    }


@pytest.mark.parametrize("name", list(_streams()))
def test_replay_takes_every_decision_the_live_guard_takes(name):
    """Whole runs: on a scripted loss (the same values whatever the weights), the replay of the stream and the
    live guard take the same decisions at the same steps, with the same LR factors and restored steps."""
    values, settings = _streams()[name]
    guard = LRGuard(gate=False, **settings, verbose=False)
    trainer = make_trainer([guard], max_steps=len(values))
    per_epoch = 13 if "13 steps" in name else 16  # the module's data: n samples in batches of 16
    trainer.fit(ScriptedLossModule(values, optimizer="adam", lr=0.01, n=16 * per_epoch))
    live = [(d.event.step, str(d.event.kind), str(d.action), d.rollback_to, d.lr_factor) for d in guard.decisions]
    result = replay(list(enumerate(values)), settings, max_steps=len(values), steps_per_epoch=per_epoch)
    offline = [(r.step, r.kind, r.action) for r in result.rows]
    assert live, "the stream should make the guard act"
    assert offline == [d[:3] for d in live]
    pairs = list(zip(live, result.rows, strict=True))
    assert all(f"back to step {d[3]}" in r.detail for d, r in pairs if d[2] == "rollback")
    assert all(f"LR x{d[4]:g}" in r.detail for d, r in pairs if d[2] in ("rollback", "lr_cut"))
    assert result.lr_factor == pytest.approx(lr_factors(trainer.optimizers)[0][0])


def test_replay_reads_the_logged_lr_and_sees_a_warm_up_as_the_live_guard_does(tmp_path, capsys):
    # a warm-up (LinearLR over the whole run) and one NaN at step 60: the live guard sees the LR rising and caps it
    def module():
        warm_up = lambda o: S.LinearLR(o, start_factor=0.1, total_iters=100)  # noqa: E731
        return ScriptedLossModule(script(nan_at=[60]), optimizer="adam", lr=0.01, scheduler=warm_up)

    logger = TensorBoardLogger(tmp_path, name="warm", version=0)
    monitor = LearningRateMonitor(logging_interval="step")
    make_trainer([monitor], max_steps=100, logger=logger, log_every_n_steps=1).fit(module())
    guard = LRGuard(gate=False, snapshot_every=10, confirm_steps=3)
    trainer = make_trainer([guard], max_steps=100)
    trainer.fit(module())
    assert [(d.event.step, d.action.value) for d in guard.decisions] == [(60, "rollback")]
    assert lr_factors(trainer.optimizers) == [[1.0]]  # capped, not cut: the LR was rising
    (cap,) = [d.lr_cap for d in guard.decisions]
    assert lr_caps(trainer.optimizers) == [[cap]] and cap == pytest.approx(0.1 * 0.01 * (0.1 + 0.9 * 60 / 100))
    assert main(["replay", logger.log_dir, "--set", "snapshot_every=10", "--set", "confirm_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "learning rate from 'lr-Adam'" in out
    assert "      60  divergence" in out and f"back to step 50, LR x1 (cumulative x1), LR capped at {cap:.3g}" in out


def test_a_csv_lr_column_marks_the_warm_up(tmp_path):
    from lr_guard.replay import load_lr_series

    rows = [(t, v, 0.001 * (t + 1)) for t, v in enumerate(script(n=100, nan_at=[60]))]
    with_lr = tmp_path / "with_lr.csv"
    with_lr.write_text("step,loss,lr\n" + "".join(f"{t},{v},{lr}\n" for t, v, lr in rows))
    lr, column = load_lr_series(with_lr)
    assert column == "lr" and len(lr) == 100
    series, _, _ = load_series(with_lr)
    settings = {"snapshot_every": 10, "confirm_steps": 3}
    # the LR rises: the cap is 0.1 x the LR at the NaN's step (0.061)
    assert (
        replay(series, settings, lr=lr).rows[0].detail == "back to step 50, LR x1 (cumulative x1), LR capped at 0.0061"
    )
    assert replay(series, settings).rows[0].detail == "back to step 50, LR x1 (cumulative x1)"  # no LR: past warm-up
    # an LR logged every 7 steps only (a monitor's log_every_n_steps): the warm-up lasts between the readings
    sparse = [(t, rate) for t, rate in lr if t % 7 == 0]
    # (the cap is read from the last reading at or before step 60: 0.057, at step 56)
    assert replay(series, settings, lr=sparse).rows[0].detail.endswith("LR x1 (cumulative x1), LR capped at 0.0057")
    with pytest.raises(ReplayError, match="'learning_rate' columns"):
        load_lr_series(with_lr, "learning_rate")


def test_replay_writes_a_tensorboard_run_beside_the_original(unguarded_run, capsys):
    _root, log_dir = unguarded_run
    assert main(["replay", log_dir, "--tensorboard", "--set", "snapshot_every=10"]) == 0
    assert "diagnostics written to" in capsys.readouterr().out
    acc = EventAccumulator(f"{log_dir}/lr_guard_replay", size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert "lr_guard/loss/raw" in acc.Tags()["scalars"] and "lr_guard/lr_factor/opt0_group0" in acc.Tags()["scalars"]
    texts = [e.step for e in acc.Tensors(f"{DECISIONS_TAG}/text_summary")]
    assert texts[0] == 60


def test_replay_of_a_bundled_csv_and_json_output(capsys):
    path = "lr_guard/data/curves/lm_gpt2_124m_modded_muon_dataspike.csv"
    assert main(["replay", path, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["step"], r["kind"], r["action"]) for r in rows} >= {(919, "spike", "none"), (947, "spike", "none")}
    assert not [r for r in rows if r["kind"] == "divergence"]


def test_config_in_lightning_cli_format(tmp_path):
    cfg = tmp_path / "cli.yaml"
    cfg.write_text(
        "trainer:\n  callbacks:\n    - class_path: lr_guard.LRGuard\n      init_args:\n"
        "        skip_batches: 7\n        spike:\n          class_path: lr_guard.SpikeDetector\n"
        "          init_args: {threshold: 5.0}\n"
    )
    settings = guard_settings(cfg, ["max_rollbacks=1", "divergence.factor=3"])
    assert settings["skip_batches"] == 7 and settings["max_rollbacks"] == 1
    assert settings["spike"].threshold == 5.0 and settings["divergence"].factor == 3.0
    series = load_curve("criteo_dlrm_warmup_divergence_inf_nan_algoperf")
    rows = replay(series, settings).rows
    # after the rollback at 71 the logged 4.5e6 waits for the values after it; the inf at 73 and the NaNs after it
    # are skipped batches; the first NaN after the 7 skips is a divergence, and with max_rollbacks=1 the stop
    actions = [r.action for r in rows if r.kind == "divergence"]
    assert actions[0] == "rollback" and set(actions[1:-1]) == {"skip"} and actions[-1] == "stop"
    assert "skip 7 batches" in rows[[r.kind for r in rows].index("divergence")].detail


def test_errors_say_what_is_wrong(unguarded_run, tmp_path, capsys):
    _, log_dir = unguarded_run
    with pytest.raises(ReplayError, match="no such file or directory"):
        load_series(tmp_path / "missing")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ReplayError, match="not a TensorBoard event file"):
        load_series(text)
    fake = tmp_path / "events.out.tfevents.123.host"
    fake.write_bytes(b"this is not a record file at all")
    with pytest.raises(ReplayError, match="holds no scalar summaries -- not a TensorBoard event file"):
        load_series(fake)
    with pytest.raises(ReplayError, match=r"no scalar tag 'val_acc'; the tags are: .*train_loss"):
        load_series(log_dir, "val_acc")
    empty = tmp_path / "empty.csv"
    empty.write_text("step,loss\n")
    with pytest.raises(ReplayError, match="is empty"):
        load_series(empty)
    bad_header = tmp_path / "bad.csv"
    bad_header.write_text("epoch,value\n1,2\n")
    with pytest.raises(ReplayError, match="needs 'step' and 'loss' columns"):
        load_series(bad_header)
    with pytest.raises(ReplayError, match="--set takes key=value"):
        guard_settings(None, ["skip_batches"])
    with pytest.raises(ReplayError, match="'speed' is not a detector"):
        guard_settings(None, ["speed.threshold=3"])
    assert main(["replay", str(empty)]) == 2
    assert "error:" in capsys.readouterr().err
    assert (
        main(["replay", "lr_guard/data/curves/resnet110_cifar10_steplr_per_epoch.csv", "--set", "skip_batches=-1"]) == 2
    )
    assert "skip_batches must be >= 0" in capsys.readouterr().err


def test_console_script_is_installed():
    import shutil
    import subprocess

    exe = shutil.which("lr-guard")
    assert exe, "pip install -e . installs the lr-guard command"
    out = subprocess.run([exe, "replay", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "what would lr_guard have done" in out.stdout


def _noisy_descent(n, seed=0):
    rng = random.Random(seed)
    return [2.0 / (1.0 + 0.02 * t) * math.exp(0.05 * rng.gauss(0.0, 1.0)) for t in range(n)]


@pytest.mark.parametrize("every", [10, 7])
def test_a_subsampled_log_is_said_so_and_replayed_as_the_live_guard_decides(tmp_path, capsys, every):
    """A loss that blows up to 3x at step 400 and stays there: the live guard rolls back a few steps after it (a
    spike logged first).
    The same run logged every step and every ``every``-th step (Lightning's ``log_every_n_steps``): the replay
    of the subsampled log says so and takes the same first decision, within the spacing."""
    values = _noisy_descent(500)
    values[400:] = [3.0 * v for v in values[400:]]
    guard = LRGuard(gate=False, verbose=False)
    make_trainer([guard], max_steps=500).fit(ScriptedLossModule(values, optimizer="adam", lr=0.01))
    live = next(d for d in guard.decisions if d.action.value != "none")  # the first that acts (a spike is logged)
    assert (str(live.event.kind), str(live.action)) == ("divergence", "rollback")
    logger = TensorBoardLogger(tmp_path, name="sparse", version=0)
    module = ScriptedLossModule(values, optimizer="adam", lr=0.01)
    make_trainer([], max_steps=500, logger=logger, log_every_n_steps=every).fit(module)
    assert main(["replay", logger.log_dir]) == 0
    out = capsys.readouterr().out
    assert f"the log holds every {every}th step" in out and "patience 2 -> 1" in out
    series, _, _ = load_series(logger.log_dir)
    first = next(r for r in replay(series).rows if r.action != "none")
    assert (first.kind, first.action) == ("divergence", "rollback")
    assert 0 <= first.step - live.event.step < every
    assert f"back to step {live.rollback_to}" in first.detail


def test_a_full_log_is_not_called_subsampled(unguarded_run, capsys):
    _root, log_dir = unguarded_run
    assert main(["replay", log_dir]) == 0
    assert "the log holds every" not in capsys.readouterr().out


def test_typos_in_settings_get_one_line_naming_the_closest_key(capsys):
    path = "lr_guard/data/curves/criteo_dlrm_warmup_divergence_inf_nan_algoperf.csv"
    cases = {
        "spike.treshold=7": "'treshold' is not an argument of SpikeDetector; did you mean 'threshold'?",
        "skip_batchs=7": "'skip_batchs' is not an LRGuard setting; did you mean 'skip_batches'?",
        "zzz=1": "'zzz' is not an LRGuard setting; the valid names are: check_every_n_steps, check_on",
        "spike.threshold=high": "SpikeDetector: threshold must be a number, got 'high'",
        "skip_batches=[1": "'[1' is not a YAML value",
    }
    for item, message in cases.items():
        assert main(["replay", path, "--set", item]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert "GuardConfig" not in err


def test_help_is_plain_text(capsys):
    with pytest.raises(SystemExit):
        main(["replay", "--help"])
    out = capsys.readouterr().out
    assert "what would lr_guard have done" in out and "GuardPolicy" in out
    assert "``" not in out and ":class:" not in out and "*without*" not in out


def test_replay_of_a_csv_imports_neither_lightning_nor_torch():
    import os
    import subprocess
    import sys

    code = (
        "import sys; from lr_guard.replay import main; "
        "main(['replay', 'lr_guard/data/curves/criteo_dlrm_warmup_divergence_inf_nan_algoperf.csv']); "
        "print(sorted(m for m in ('pytorch_lightning', 'lightning', 'torch', 'scipy') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
