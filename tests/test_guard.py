"""LRGuard and the single-job callbacks on real Trainers (CPU, a few seconds each)."""

import copy
import math
import os

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import LRRecorder, make_trainer
from torch.optim import lr_scheduler as S

from lr_guard import (
    Action,
    DivergenceDetector,
    DivergenceRollback,
    LRGuard,
    PlateauDetector,
    PlateauLRReducer,
    SpikeDetector,
)
from lr_guard.testing import ScriptedLossModule, TinyRegressionModule


def decaying(n=400, nan_at=(), value=math.nan):
    script = [1.0 / (1.0 + 0.02 * t) for t in range(n)]
    for t in nan_at:
        script[t] = value
    return script


def finite(module):
    return all(torch.isfinite(p).all() for p in module.parameters())


class StateRecorder(pl.Callback):
    """Copies the full training state at the start of the chosen global steps, and after every rollback."""

    def __init__(self, guard, steps=()):
        self.guard, self.steps, self.at, self.after_rollback = guard, set(steps), {}, []

    def _state(self, trainer, module):
        return {
            "model": copy.deepcopy(module.state_dict()),
            "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
            "schedulers": [copy.deepcopy(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs],
            "lr": [g["lr"] for g in trainer.optimizers[0].param_groups],
        }

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step in self.steps and trainer.global_step not in self.at:
            self.at[trainer.global_step] = self._state(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        rollbacks = [d for d in self.guard.decisions if d.action == Action.ROLLBACK]
        if len(rollbacks) > len(self.after_rollback):
            self.after_rollback.append(self._state(trainer, module))


def assert_same_tensors(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            if k in ("lr", "initial_lr", "lr_guard_factor", "lr_guard_unscaled", "lr_guard_effective", "_last_lr"):
                continue
            assert_same_tensors(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_nan_rollback_restores_weights_moments_and_scheduler_exactly():
    guard = LRGuard(gate=False, snapshot_every=20, confirm_steps=5)
    recorder = StateRecorder(guard, steps=[40])
    module = ScriptedLossModule(
        decaying(nan_at=[50]), optimizer="adam", lr=0.01, scheduler=lambda o: S.StepLR(o, step_size=15, gamma=0.5)
    )
    make_trainer([guard, recorder], max_steps=80).fit(module)
    [decision] = guard.decisions
    assert decision.action == Action.ROLLBACK and decision.rollback_to == 40 and decision.event.step == 50
    assert "rolled back to step 40" in decision.message
    before, after = recorder.at[40], recorder.after_rollback[0]
    assert_same_tensors(before["model"], after["model"])  # weights and BatchNorm buffers
    assert_same_tensors(before["optimizer"]["state"], after["optimizer"]["state"])  # Adam moments and steps
    assert before["schedulers"][0]["last_epoch"] == after["schedulers"][0]["last_epoch"]  # scheduler position
    # one NaN after a calm stretch is a bad batch: the LR is that of step 40 again, not cut (see below)
    assert after["lr"] == pytest.approx(before["lr"])
    assert "a bad batch" in decision.message
    assert finite(module)


def test_a_second_blow_up_in_the_same_incident_cuts_the_lr():
    guard = LRGuard(gate=False, snapshot_every=20, confirm_steps=5)
    recorder = LRRecorder()
    module = ScriptedLossModule(decaying(nan_at=[50, 58]), optimizer="adam", lr=0.01)
    make_trainer([guard, recorder], max_steps=80).fit(module)
    # 50: a bad batch (LR kept); 58 comes 2 values after the rollback, before any new snapshot is confirmed
    assert [(d.action, d.rollback_to) for d in guard.decisions] == [(Action.ROLLBACK, 40), (Action.ROLLBACK, 40)]
    assert [d.lr_after / d.lr_before for d in guard.decisions] == pytest.approx([1.0, 0.5])
    assert recorder.lrs[79] == [pytest.approx(0.005)]


def _policy(**kwargs):
    from lr_guard.config import GuardConfig
    from lr_guard.policy import GuardPolicy

    settings = dict(
        plateau_factor=0.5,
        oscillation_factor=0.5,
        rollback=True,
        rollback_factor=0.5,
        skip_batches=0,
        max_rollbacks=3,
        snapshot_every=10,
        confirm_steps=5,
    )
    detectors = {"divergence": DivergenceDetector()}
    policy = GuardPolicy(detectors, GuardConfig(**{**settings, **kwargs}))
    policy.start(0)
    return policy


@pytest.mark.parametrize(
    ("case", "factor"),
    [
        ("bad_batch", 1.0),
        ("warm_up", 0.5),
        ("warm_up_capped", 1.0),
        ("switched_off", 0.5),
        ("too_early", 0.5),
        ("smoothed_rise", 0.5),
    ],
)
def test_which_rollbacks_keep_the_lr(case, factor):
    # in a warm-up the LR factor is kept when the rollback caps the LR instead (warmup_cap_factor)
    cap = 0.5 if case == "warm_up_capped" else None
    policy = _policy(keep_lr_on_bad_batch=case != "switched_off", warmup_cap_factor=cap)
    policy.lr_rising = case.startswith("warm_up")
    calm = 3 if case == "too_early" else 30
    values = [2.0 - 0.01 * t for t in range(calm)]
    # a blow-up of one value (NaN), or a smoothed loss at ~3x its best (no single value at 10x)
    trouble = [5.0] * 6 if case == "smoothed_rise" else [math.nan]
    intents = [i for t, v in enumerate(values + trouble) for i in policy.observe(t, v)]
    assert [i.action for i in intents] == [Action.ROLLBACK]
    assert intents[0].lr_factor == factor
    assert intents[0].cap_at == (calm if cap else None)  # the cap is read from the LR of the trouble's first step


def test_a_warm_up_lasts_between_lr_readings_and_a_second_reading_at_one_step_changes_nothing():
    # the guard reads the LR at every check; the end of an epoch checks again at the step the last batch checked
    policy = _policy()
    policy.note_lr(0.001, 0)
    policy.note_lr(0.002, 8)
    assert policy.lr_rising
    policy.note_lr(0.002, 8)  # the epoch's end, same step: the schedule has not moved, the warm-up goes on
    assert policy.lr_rising
    policy.note_lr(0.002, 16)  # a later step at the same LR: the warm-up is over
    assert not policy.lr_rising


def test_values_are_checked_in_batches_and_a_rollback_drops_the_rest_of_its_batch():
    class Recording(DivergenceDetector):
        def update(self, value, step):
            self.seen = [*getattr(self, "seen", []), step]
            return super().update(value, step)

    divergence = Recording()
    guard = LRGuard(gate=False, divergence=divergence, snapshot_every=20, confirm_steps=5, check_every_n_steps=8)
    module = ScriptedLossModule(decaying(nan_at=[50, 51]), optimizer="adam", lr=0.01)
    make_trainer([guard], max_steps=80).fit(module)
    # steps 48..55 are checked together at step 56: the NaN of 50 rolls back there; 51..55 (NaN at 51 included)
    # trained weights that are gone, so they are never looked at
    [decision] = guard.decisions
    assert (decision.event.step, decision.step, decision.rollback_to) == (50, 56, 40)
    assert 51 not in divergence.seen and finite(module)
    resumed = divergence.seen[divergence.seen.index(50) + 1 :]
    assert resumed[0] == 56  # the training steps after the rollback go on counting from Lightning's global_step


def test_a_failed_start_restarts_from_the_initial_state_with_a_lower_lr():
    # The loss never gets below where it started (a model broken in its first steps): each plateau restarts from
    # step 0 with half the LR, at most max_rollbacks times; then plateaus get ordinary cuts.
    plateau = PlateauDetector(patience=20, window=5, noise_sigmas=0, warmup_steps=0)
    guard = LRGuard(plateau=plateau, snapshot_every=10, confirm_steps=3, max_rollbacks=2, check_every_n_steps=1)
    recorder = StateRecorder(guard, steps=[0])
    module = ScriptedLossModule([2.3], optimizer="adam", lr=0.01)
    make_trainer([guard, recorder], max_steps=120).fit(module)
    actions = [(d.action, d.rollback_to) for d in guard.decisions]
    assert actions[:3] == [(Action.ROLLBACK, 0), (Action.ROLLBACK, 0), (Action.LR_CUT, None)]
    assert "a failed start" in guard.decisions[0].message and "restart 1 of 2" in guard.decisions[0].message
    for after in recorder.after_rollback:  # the weights and Adam's state training started from
        assert_same_tensors(recorder.at[0]["model"], after["model"])
        assert_same_tensors(recorder.at[0]["optimizer"]["state"], after["optimizer"]["state"])
    assert [d.lr_after for d in guard.decisions[:3]] == pytest.approx([0.005, 0.0025, 0.00125])
    assert guard.policy.origin is None and len(guard._store) <= 2


def test_progress_ends_the_failed_start_watch_and_frees_its_snapshot():
    plateau = PlateauDetector(patience=20, window=5, noise_sigmas=0, warmup_steps=0)
    guard = LRGuard(plateau=plateau, snapshot_every=10, confirm_steps=3, check_every_n_steps=1)
    script = decaying(n=30) + [decaying(n=30)[-1]] * 100  # a real fall, then flat
    make_trainer([guard], max_steps=80).fit(ScriptedLossModule(script, optimizer="adam", lr=0.01))
    assert {d.action for d in guard.decisions} == {Action.LR_CUT}  # plateaus after progress: plain cuts
    assert guard.policy.origin is None and 0 not in guard._store


def test_host_scalars_hand_out_batches_in_order():
    from lr_guard.actions import HostScalars

    host = HostScalars()
    host.push([3, 4], torch.tensor([1.5, 2.5]))
    host.push([5], [7.0])
    assert len(host) == 3 and host.ready() == [(3, 1.5), (4, 2.5), (5, 7.0)] and len(host) == 0
    host.push([6], torch.tensor(1.0))
    host.clear()
    assert host.drain() == []
    with pytest.raises(ValueError, match="2 steps but 3 values"):
        host.push([1, 2], torch.zeros(3))


def test_snapshot_survives_being_restored_twice():
    guard = LRGuard(gate=False, snapshot_every=1000, max_rollbacks=5, skip_batches=0)
    recorder = StateRecorder(guard, steps=[0])
    make_trainer([guard, recorder], max_steps=60).fit(
        ScriptedLossModule(decaying(nan_at=[20, 40]), optimizer="adam", lr=0.01)
    )
    assert [d.rollback_to for d in guard.decisions] == [0, 0]
    for after in recorder.after_rollback:
        assert_same_tensors(recorder.at[0]["model"], after["model"])
        assert_same_tensors(recorder.at[0]["optimizer"]["state"], after["optimizer"]["state"])


def test_skipped_batches_leave_weights_and_optimizer_state_untouched():
    guard = LRGuard(gate=False, snapshot_every=10, confirm_steps=3, skip_batches=3, check_every_n_steps=1)
    recorder = StateRecorder(guard, steps=[31, 32, 33, 34])
    module = ScriptedLossModule(decaying(nan_at=[30]), optimizer="adam", lr=0.01)
    make_trainer([guard, recorder], max_steps=40).fit(module)
    assert guard.decisions[0].skip_batches == 3 and guard.counts["skipped_batches"] == 3
    rolled = recorder.after_rollback[0]
    for step in (31, 32, 33, 34):  # state at the start of 31..34 = right after the rollback: 31-33 were skipped
        assert_same_tensors(rolled["model"], recorder.at[step]["model"])
        assert_same_tensors(rolled["optimizer"]["state"], recorder.at[step]["optimizer"]["state"])
    assert "skipping the next 3 batches" in guard.decisions[0].message


def test_no_snapshot_taken_during_an_anomaly_is_used():
    # A spike at 49 makes the snapshot pending at 50 unconfirmed... and the NaN at 52 rolls back to 40, not 50.
    script = decaying()
    script[49], script[52] = 5.0, math.nan
    guard = LRGuard(gate=False, snapshot_every=10, confirm_steps=5)
    make_trainer([guard], max_steps=70).fit(ScriptedLossModule(script, optimizer="adam", lr=0.01))
    rollback = next(d for d in guard.decisions if d.action == Action.ROLLBACK)
    assert rollback.rollback_to == 40


def test_max_rollbacks_exhausted_stops_with_a_loadable_checkpoint(tmp_path):
    script = decaying(n=40) + [math.nan] * 200
    guard = LRGuard(gate=False, snapshot_every=10, confirm_steps=3, max_rollbacks=2, checkpoint_dir=str(tmp_path))
    trainer = make_trainer([guard], max_steps=200)
    module = ScriptedLossModule(script, optimizer="adam", lr=0.01)
    trainer.fit(module)
    actions = [d.action for d in guard.decisions]
    assert actions == [Action.ROLLBACK, Action.ROLLBACK, Action.STOP]
    stop = guard.decisions[-1]
    assert (
        stop.checkpoint == guard.checkpoint_path == os.path.join(str(tmp_path), "last_good_step30.ckpt")
    )  # 40 saw the NaN
    assert os.path.isfile(stop.checkpoint) and "resume with Trainer.fit" in stop.message
    assert trainer.global_step < 200 and finite(module)
    checkpoint = torch.load(stop.checkpoint, weights_only=False)
    assert any(k.startswith("LRGuard") for k in checkpoint["callbacks"])
    # The checkpoint resumes: a healthy continuation trains on from it.
    resumed = ScriptedLossModule(decaying(n=200), optimizer="adam", lr=0.01)
    again = make_trainer([LRGuard(gate=False)], max_steps=trainer.global_step + 20)
    again.fit(resumed, ckpt_path=stop.checkpoint)
    assert again.global_step == trainer.global_step + 20 and finite(resumed)
    assert_same_tensors(checkpoint["state_dict"], dict(checkpoint["state_dict"]))


def test_nan_batch_is_survived_and_the_run_ends_close_to_a_clean_one():
    clean = TinyRegressionModule(lr=0.05, seed=1)
    make_trainer(max_steps=300).fit(clean)
    poisoned = TinyRegressionModule(lr=0.05, seed=1, poison_steps=[150])
    make_trainer(max_steps=300).fit(poisoned)
    assert not finite(poisoned)  # without a guard one NaN batch ruins the run
    guarded = TinyRegressionModule(lr=0.05, seed=1, poison_steps=[150])
    guard = LRGuard(gate=False)
    make_trainer([guard], max_steps=300).fit(guarded)
    assert finite(guarded) and guard.counts["rollbacks"] == 1
    assert guarded.full_loss() < 1.5 * clean.full_loss() + 0.01


def test_learning_rate_too_high_for_sgd_is_cut_until_training_converges():
    unguarded = TinyRegressionModule(lr=1.0, seed=2)
    make_trainer(max_steps=200).fit(unguarded)
    assert not finite(unguarded) or not math.isfinite(unguarded.full_loss()) or unguarded.full_loss() > 10
    module = TinyRegressionModule(lr=1.0, seed=2)
    guard = LRGuard(snapshot_every=10, confirm_steps=5, max_rollbacks=10)
    make_trainer([guard], max_steps=400).fit(module)
    assert guard.counts["rollbacks"] >= 1 and finite(module)
    assert module.full_loss() < 0.5
    assert module.trainer.optimizers[0].param_groups[0]["lr"] < 1.0


def test_warmup_to_a_too_high_peak_is_rescued():
    warmup = lambda o: S.LinearLR(o, start_factor=0.01, total_iters=100)  # noqa: E731 - to lr=1.0, too high
    unguarded = TinyRegressionModule(lr=1.0, seed=3, scheduler=warmup)
    make_trainer(max_steps=600).fit(unguarded)
    bad = not finite(unguarded) or not math.isfinite(unguarded.full_loss()) or unguarded.full_loss() > 10
    module = TinyRegressionModule(lr=1.0, seed=3, scheduler=warmup)
    guard = LRGuard(snapshot_every=10, confirm_steps=5, max_rollbacks=10)
    make_trainer([guard], max_steps=600).fit(module)
    # The first rollback caps the LR at a tenth of the LR where the trouble began (warmup_cap_factor); later ones halve
    # factor and cap alike until it is stable.
    assert bad and finite(module) and module.full_loss() < 0.5
    first = next(d for d in guard.decisions if d.action.value == "rollback")
    assert first.lr_cap is not None and first.lr_factor == 1.0 and guard.decisions[-1].lr_after < 0.1


def test_plateau_cut_at_the_expected_step():
    reducer = PlateauLRReducer(plateau=PlateauDetector(patience=20, window=5, noise_sigmas=0, warmup_steps=0))
    recorder = LRRecorder()
    script = decaying(n=30) + [decaying(n=30)[-1]] * 100
    make_trainer([reducer, recorder], max_steps=70).fit(ScriptedLossModule(script, lr=0.1))
    # flat from step 29; the 5-value mean last improves at 33; more than 20 bad updates: step 54. The values are
    # checked in batches of 8 steps, so the cut is made at the check of step 56 and applies from the update 56.
    assert [(d.event.step, d.step, d.action) for d in reducer.decisions] == [(54, 56, Action.LR_CUT)]
    assert recorder.lrs[55] == [0.1] and recorder.lrs[56] == [pytest.approx(0.05)]


def test_gradient_accumulation_feeds_the_mean_per_optimizer_step():
    class Recording(DivergenceDetector):
        def update(self, value, step):
            self.seen = [*getattr(self, "seen", []), (step, value)]
            return super().update(value, step)

    divergence = Recording()
    guard = LRGuard(divergence=divergence, snapshot_every=5, confirm_steps=2)
    make_trainer([guard], max_steps=30, accumulate_grad_batches=4).fit(
        ScriptedLossModule(decaying(nan_at=[20]), optimizer="adam", lr=0.01)
    )
    values = dict(divergence.seen)
    assert values[3] == pytest.approx(decaying()[3]) and values[10] == pytest.approx(decaying()[10])
    assert [d.event.step for d in guard.decisions] == [20]
    assert sorted(values)[:4] == [0, 1, 2, 3]


def test_monitor_a_logged_metric_and_missing_key_lists_the_keys():
    guard = LRGuard(monitor="train_loss", check_on="train_step", snapshot_every=10, confirm_steps=3)
    make_trainer([guard], max_steps=40).fit(ScriptedLossModule(decaying(nan_at=[25]), optimizer="adam"))
    assert [d.event.step for d in guard.decisions] == [25]
    missing = LRGuard(monitor="val_loss", check_on="train_step")
    with pytest.raises(RuntimeError, match=r"monitor='val_loss', which is not among the logged metrics.*train_loss"):
        make_trainer([missing], max_steps=5).fit(ScriptedLossModule(decaying()))


def test_users_callbacks_and_gradient_clipping_keep_working(tmp_path):
    from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="train_loss", every_n_train_steps=10)
    stopper = EarlyStopping(monitor="train_loss", patience=1000, check_on_train_epoch_end=True)
    guard = LRGuard(gate=False, snapshot_every=10, confirm_steps=3, keep_lr_on_bad_batch=False)
    trainer = make_trainer(
        [guard, checkpoint, stopper, LearningRateMonitor(logging_interval="step")],
        max_steps=60,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=True,
        gradient_clip_val=0.5,
        log_every_n_steps=1,
    )
    module = ScriptedLossModule(decaying(nan_at=[35]), optimizer="adam", lr=0.01)
    trainer.fit(module)
    assert guard.counts["rollbacks"] == 1 and finite(module)
    assert checkpoint.best_model_path and os.path.isfile(checkpoint.best_model_path)
    saved = torch.load(checkpoint.best_model_path, weights_only=False)
    assert guard.state_key in saved["callbacks"]
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    lr_rows = [row.split(",")[header.index("lr-Adam")] for row in metrics[1:]]
    lrs = sorted({float(v) for v in lr_rows if v})
    assert lrs == pytest.approx([0.005, 0.01])  # the monitor shows the effective LR, before and after the cut


def test_healthy_run_with_the_guard_ends_within_one_percent():
    plain = TinyRegressionModule(lr=0.05, seed=4)
    make_trainer(max_steps=300).fit(plain)
    guarded = TinyRegressionModule(lr=0.05, seed=4)
    guard = LRGuard()
    make_trainer([guard], max_steps=300).fit(guarded)
    assert guard.counts["rollbacks"] == 0 and guard.counts["lr_cuts"] == 0
    assert guarded.full_loss() == pytest.approx(plain.full_loss(), rel=0.01)


def test_lightning_namespace_is_served_by_its_own_class():
    import lightning.pytorch as L

    from lr_guard.lightning import LRGuard as LightningGuard

    assert issubclass(LightningGuard, L.Callback) and not issubclass(LightningGuard, pl.Callback)
    assert issubclass(LRGuard, pl.Callback) and not issubclass(LRGuard, L.Callback)
    guard = LightningGuard(snapshot_every=10, confirm_steps=3, gate=False)
    trainer = L.Trainer(
        callbacks=[guard],
        max_steps=40,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(_lightning_scripted(decaying(nan_at=[25])))
    assert [(d.action, d.rollback_to) for d in guard.decisions] == [(Action.ROLLBACK, 20)]


def test_lightning_cli_of_each_namespace_takes_its_own_class(tmp_path):
    import lightning.pytorch as L
    from lightning.pytorch.cli import LightningCLI

    class Module(L.LightningModule):
        def __init__(self, lr: float = 0.1):
            super().__init__()

    def build(class_path):
        config = tmp_path / "config.yaml"
        config.write_text(f"trainer:\n  logger: false\n  callbacks:\n    - class_path: {class_path}\n")
        return LightningCLI(Module, run=False, args=["--config", str(config)], save_config_callback=None)

    cli = build("lr_guard.lightning.LRGuard")
    assert type(cli.trainer.callbacks[0]).__module__ == "lr_guard.lightning"
    with pytest.raises(SystemExit):  # the type-checked config refuses the other namespace's callback
        build("lr_guard.LRGuard")


def _lightning_scripted(script):
    import lightning.pytorch as L
    from torch import nn
    from torch.utils.data import DataLoader

    from lr_guard.testing import regression_data

    class Scripted(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(8, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            q = nn.functional.mse_loss(self.net(x), y) + 1e-3
            return script[min(self.global_step, len(script) - 1)] * q / q.detach()

        def train_dataloader(self):
            return DataLoader(regression_data(), batch_size=16)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.01)

    return Scripted()


def test_lightning_cli_builds_the_guard_from_yaml(tmp_path):
    from pytorch_lightning.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lr_guard.LRGuard\n"
        "      init_args:\n"
        "        skip_batches: 4\n"
        "        max_rollbacks: 2\n"
        "        spike:\n"
        "          class_path: lr_guard.SpikeDetector\n"
        "          init_args:\n"
        "            threshold: 7.0\n"
        "        plateau_factor: 0.3\n"
    )
    cli = LightningCLI(
        TinyRegressionModule,
        run=False,
        args=["--config", str(config), "--trainer.logger=false"],
        save_config_callback=None,
    )
    [guard] = [c for c in cli.trainer.callbacks if isinstance(c, LRGuard)]
    assert (guard.skip_batches, guard.max_rollbacks, guard.plateau_factor) == (4, 2, 0.3)
    assert isinstance(guard.detectors["spike"], SpikeDetector) and guard.detectors["spike"].threshold == 7.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"monitor": ""}, ValueError, "monitor must be None"),
        ({"check_on": "epoch"}, ValueError, "check_on must be one of 'train_step', 'validation'; got 'epoch'"),
        ({"plateau_factor": 1.0}, ValueError, r"plateau_factor must be in \(0.0, 1.0\), got 1.0"),
        ({"oscillation_factor": 0}, ValueError, r"oscillation_factor must be in \(0.0, 1.0\), got 0"),
        ({"rollback_factor": None}, TypeError, "rollback_factor must be a number, got None"),
        ({"rollback": "yes"}, TypeError, "rollback must be True or False"),
        ({"skip_batches": -1}, ValueError, "skip_batches must be >= 0, got -1"),
        ({"max_rollbacks": 1.5}, TypeError, "max_rollbacks must be an int, got 1.5"),
        ({"snapshot_every": 0}, ValueError, "snapshot_every must be >= 1, got 0"),
        ({"confirm_steps": 0}, ValueError, "confirm_steps must be >= 1, got 0"),
        ({"check_every_n_steps": 0}, ValueError, "check_every_n_steps must be >= 1, got 0"),
        ({"min_lr": -1e-3}, ValueError, "min_lr must be >= 0.0, got -0.001"),
        ({"min_lr": [0.1, -1]}, ValueError, r"min_lr\[1\] must be >= 0.0, got -1"),
        ({"eps": -1}, ValueError, "eps must be >= 0.0, got -1"),
        ({"snapshot_device": "cuda"}, ValueError, "snapshot_device must be one of 'cpu', 'same', 'disk'; got 'cuda'"),
        ({"checkpoint_dir": 3}, TypeError, "checkpoint_dir must be a path or None, got 3"),
        (
            {"spike": PlateauDetector()},
            TypeError,
            "spike must be a SpikeDetector, True or False; got a PlateauDetector",
        ),
        ({"divergence": "on"}, TypeError, "divergence must be a DivergenceDetector, True or False; got 'on'"),
    ],
)
def test_bad_arguments_raise_naming_the_parameter(kwargs, error, match):
    with pytest.raises(error, match=match):
        LRGuard(**kwargs)


def test_single_job_callbacks_validate_and_need_their_detector():
    with pytest.raises(ValueError, match="plateau must be a PlateauDetector or True"):
        PlateauLRReducer(plateau=False)
    with pytest.raises(ValueError, match="divergence must be a DivergenceDetector or True"):
        DivergenceRollback(divergence=False)
    with pytest.raises(ValueError, match=r"factor must be in \(0.0, 1.0\)"):
        DivergenceRollback(factor=2.0)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: PlateauLRReducer(factor=1.0), ValueError, r"^factor must be in \(0.0, 1.0\), got 1.0$"),
        (lambda: DivergenceRollback(factor=0), ValueError, r"^factor must be in \(0.0, 1.0\), got 0$"),
        (lambda: DivergenceRollback(factor="half"), TypeError, r"^factor must be a number, got 'half'"),
        (lambda: PlateauLRReducer(verbose="no"), TypeError, r"^verbose must be True or False, got 'no'$"),
        (lambda: DivergenceRollback(verbose="no"), TypeError, r"^verbose must be True or False, got 'no'$"),
        (lambda: LRGuard(verbose="no"), TypeError, r"^verbose must be True or False, got 'no'$"),
        (lambda: LRGuard(skip_batches=np.float64(3.0)), TypeError, r"^skip_batches must be an int, got np.float64"),
    ],
)
def test_single_job_callbacks_name_the_parameter_as_passed(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_single_job_callbacks_name_their_factor_when_it_is_set_later():
    reducer, rollback = PlateauLRReducer(), DivergenceRollback()
    with pytest.raises(ValueError, match=r"^factor must be in \(0.0, 1.0\), got 1.5$"):
        reducer.factor = 1.5
    with pytest.raises(ValueError, match=r"^factor must be in \(0.0, 1.0\), got -1$"):
        rollback.factor = -1
    reducer.factor, rollback.factor = 0.25, np.float32(0.75)
    assert (reducer.plateau_factor, rollback.rollback_factor) == (0.25, 0.75)


def test_numpy_numbers_are_taken_as_the_python_numbers_they_are():
    guard = DivergenceRollback(
        gate=False,
        factor=np.float64(0.5),
        snapshot_every=np.int64(8),
        confirm_steps=np.int32(2),
        check_every_n_steps=np.int64(1),
        skip_batches=np.int64(3),
        spike=SpikeDetector(warmup_steps=np.int64(10)),
    )
    assert type(guard.skip_batches) is int and type(guard.detectors["spike"].warmup_steps) is int
    make_trainer([guard], max_steps=40).fit(ScriptedLossModule(decaying(nan_at=(20,))))
    assert [d.rollback_to for d in guard.decisions if d.action == Action.ROLLBACK] == [16]
    assert guard.counts["skipped_batches"] == 3


def test_min_lr_per_group_must_match_the_groups():
    guard = LRGuard(min_lr=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="min_lr has 3 values but the optimizers have 2 param groups"):
        make_trainer([guard], max_steps=2).fit(ScriptedLossModule(decaying(), param_groups=2))


def test_divergence_rollback_alone():
    guard = DivergenceRollback(
        gate=False, snapshot_every=10, confirm_steps=3, factor=0.25, skip_batches=1, keep_lr_on_bad_batch=False
    )
    recorder = LRRecorder()
    make_trainer([guard, recorder], max_steps=40).fit(ScriptedLossModule(decaying(nan_at=[25]), lr=0.1))
    assert [d.action for d in guard.decisions] == [Action.ROLLBACK]
    assert recorder.lrs[39] == [pytest.approx(0.025)]


def test_manual_optimization_needs_a_monitor():
    class Manual(ScriptedLossModule):
        def __init__(self):
            super().__init__(decaying())
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = super().training_step(batch, batch_idx)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    with pytest.raises(ValueError, match="manual optimization.*monitor='train_loss'"):
        make_trainer([LRGuard()], max_steps=3).fit(Manual())


def test_spike_detector_setting_is_used():
    guard = LRGuard(gate=False, spike=SpikeDetector(threshold=3.0), plateau=False, oscillation=False)
    script = decaying()
    script[60] = 3.0
    make_trainer([guard], max_steps=80).fit(ScriptedLossModule(script))
    assert [(d.event.kind.value, d.event.step, d.action) for d in guard.decisions] == [("spike", 60, Action.NONE)]


def test_skip_spikes_drops_the_offending_update_and_a_nan_step_needs_no_rollback():
    script = decaying()
    script[60], script[70] = 4.0, math.nan
    guard = LRGuard(skip_spikes=True, snapshot_every=10, confirm_steps=3)
    recorder = StateRecorder(guard, steps=[60, 61, 70, 71])
    module = ScriptedLossModule(script, optimizer="adam", lr=0.01)
    make_trainer([guard, recorder], max_steps=80).fit(module)
    assert [(d.event.kind.value, d.event.step, d.action) for d in guard.decisions] == [
        ("spike", 60, Action.SKIP),
        ("divergence", 70, Action.SKIP),
    ]
    for a, b in ((60, 61), (70, 71)):  # neither the spike's nor the NaN's update was applied
        assert_same_tensors(recorder.at[a]["model"], recorder.at[b]["model"])
        assert_same_tensors(recorder.at[a]["optimizer"]["state"], recorder.at[b]["optimizer"]["state"])
    assert guard.counts["rollbacks"] == 0 and finite(module)
    with pytest.raises(ValueError, match="skip_spikes=True needs the spike detector"):
        LRGuard(skip_spikes=True, spike=False)
    with pytest.raises(TypeError, match="skip_spikes must be True or False"):
        LRGuard(skip_spikes=1)


class TwoOptimizers(ScriptedLossModule):
    """Manual optimization with two optimizers (Lightning allows several only there) and two schedulers."""

    def __init__(self, script):
        super().__init__(script)
        self.automatic_optimization = False

    def configure_optimizers(self):
        first = torch.optim.SGD(self.net[0].parameters(), lr=0.1)
        second = torch.optim.Adam(
            [{"params": self.net[1].parameters(), "lr": 0.01}, {"params": self.net[3].parameters(), "lr": 0.001}]
        )
        return [first, second], [S.StepLR(first, 10, 0.5), S.CosineAnnealingLR(second, 100)]

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()
        for sched in self.lr_schedulers():
            sched.step()


def test_several_optimizers_in_manual_optimization_are_cut_together():
    def lrs_of(guard):
        recorder = LRRecorder()
        make_trainer([guard, recorder] if guard else [recorder], max_steps=120).fit(TwoOptimizers([1.0]))
        return recorder.lrs

    guard = LRGuard(
        monitor="train_loss",
        check_on="train_step",
        spike=False,
        oscillation=False,
        divergence=False,
        rollback=False,
        min_lr=[0.0, 0.0, 0.004],
        plateau=PlateauDetector(patience=39, window=1, noise_sigmas=0, warmup_steps=0, cooldown=10_000),
        check_every_n_steps=1,
    )
    ref, cut = lrs_of(None), lrs_of(guard)
    assert [d.action for d in guard.decisions] == [Action.LR_CUT]
    # global_step counts both optimizers' steps: the batch whose loss is step 80 also holds update 81
    cut_at = guard.decisions[0].event.step + 1
    for step in ref:
        if step <= cut_at:
            assert cut[step] == pytest.approx(ref[step])
        else:  # x0.5 for every group, floored at the third group's min_lr
            expected = [0.5 * ref[step][0], 0.5 * ref[step][1], max(0.5 * ref[step][2], min(ref[step][2], 0.004))]
            assert cut[step] == pytest.approx(expected), step


class WithValidation(ScriptedLossModule):
    """Logs a scripted val_loss after every validation run (one value per run)."""

    def __init__(self, val_script):
        super().__init__(decaying(), optimizer="adam", lr=0.01)
        self.val_script, self.val_runs = val_script, 0

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.tensor(self.val_script[min(self.val_runs, len(self.val_script) - 1)]))

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.val_runs += 1

    def val_dataloader(self):
        return self.train_dataloader()


def test_validation_level_monitor_rolls_back_on_a_nan_validation_loss():
    val = [1.0 / (1 + i) for i in range(20)]
    val[4] = math.nan  # the fifth validation run
    guard = LRGuard(gate=False, monitor="val_loss", snapshot_every=5, confirm_steps=1)
    assert guard.check_on is None  # chosen where val_loss is logged, at the first optimizer step
    module = WithValidation(val)
    make_trainer(
        [guard],
        max_steps=80,
        val_check_interval=10,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=1,
    ).fit(module)
    assert guard.check_on == "validation"
    [decision] = guard.decisions
    assert decision.action == Action.ROLLBACK and decision.event.step == 50  # validation after 50 steps
    # snapshot taken at 35 (every 5 steps, one pending at a time), confirmed by the validation at 40; the one
    # pending from 45 is dropped by the NaN at 50
    assert decision.rollback_to == 35 and finite(module)


def test_rollback_restores_the_random_number_generators():
    class Draws(pl.Callback):
        def __init__(self):
            self.draws = {}

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.draws.setdefault(trainer.global_step, []).append(torch.rand(1).item())

    guard = LRGuard(gate=False, snapshot_every=10, confirm_steps=2, check_every_n_steps=1)
    draws = Draws()
    make_trainer([guard, draws], max_steps=16).fit(ScriptedLossModule(decaying(nan_at=[12]), optimizer="adam"))
    assert guard.decisions[0].rollback_to == 10
    # torch's generator was put back to its state at step 10: the draws after the rollback repeat those at 10
    # (within one epoch: a new DataLoader iterator draws a seed from torch's generator)
    assert draws.draws[13][0] == draws.draws[10][0] and draws.draws[14][0] == draws.draws[11][0]
    assert draws.draws[10][0] != draws.draws[11][0]


def test_settings_changed_after_construction_take_effect():
    guard = LRGuard(gate=False, snapshot_every=10, confirm_steps=3)
    guard.max_rollbacks = 0  # one source of truth: the rules see the change
    assert guard.policy.config.max_rollbacks == 0 and guard.settings()["max_rollbacks"] == 0
    make_trainer([guard], max_steps=40).fit(ScriptedLossModule(decaying(nan_at=[25]), optimizer="adam"))
    assert [d.action for d in guard.decisions] == [Action.STOP]
