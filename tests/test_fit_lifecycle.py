"""The guard over a whole `fit` on real Trainers: where it watches, how its stop ends the run, what a resume from
its stop checkpoint gets, and what one guard object keeps from one fit to the next."""

import math

import pytest
import torch
from conftest import make_trainer

from lr_guard import Action, LRGuard, SpikeDetector
from lr_guard.testing import ScriptedLossModule


def decaying(n=400, nan_at=()):
    script = [1.0 / (1.0 + 0.02 * t) for t in range(n)]
    for t in nan_at:
        script[t] = math.nan
    return script


def finite(module):
    return all(torch.isfinite(p).all() for p in module.parameters())


def diverging_run(tmp_path, **trainer_kwargs):
    """A run that diverges at step 40 and every time after: two rollbacks, then the guard stops."""
    module = ScriptedLossModule(decaying(n=40) + [math.nan] * 400, optimizer="adam", lr=0.01)
    guard = LRGuard(gate=False, snapshot_every=10, confirm_steps=3, max_rollbacks=2, checkpoint_dir=str(tmp_path))
    trainer = make_trainer([guard], max_steps=300, **trainer_kwargs)
    trainer.fit(module)
    return trainer, guard, module


# -- the guard's stop ends the run, whatever the Trainer's minimums ----------------------------------------------
@pytest.mark.parametrize("minimum", [{"min_steps": 200}, {"min_epochs": 12}], ids=["min_steps", "min_epochs"])
def test_the_guards_stop_ends_the_run_before_min_steps_or_min_epochs(tmp_path, minimum):
    trainer, guard, module = diverging_run(tmp_path, **minimum)  # 16 steps an epoch: 12 epochs are 192 steps
    assert [d.action for d in guard.decisions] == [Action.ROLLBACK, Action.ROLLBACK, Action.STOP]
    assert trainer.global_step < 100 and finite(module)  # stopped at once, on the restored good state
    # the Trainer's own settings are as the user gave them once the run is over
    [(name, value)] = minimum.items()
    assert getattr(trainer.fit_loop, name) == value


# -- monitor=: watched where the metric is logged, or a clear error ----------------------------------------------
def test_a_monitored_training_metric_is_watched_after_every_step_in_a_run_without_validation():
    module = ScriptedLossModule(decaying(nan_at=(60,)), optimizer="adam", lr=0.01)  # logs train_loss every step
    guard = LRGuard(gate=False, monitor="train_loss", snapshot_every=10, confirm_steps=3)
    make_trainer([guard], max_steps=100).fit(module)
    assert guard.check_on == "train_step"
    [rollback] = guard.decisions
    assert rollback.action == Action.ROLLBACK and rollback.event.step == 60 and finite(module)


class WithValidation(ScriptedLossModule):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.tensor(0.5))

    def val_dataloader(self):
        return self.train_dataloader()


def test_a_monitored_training_metric_is_watched_after_every_step_beside_a_validation_loop():
    module = WithValidation(decaying(nan_at=(60,)), optimizer="adam", lr=0.01)
    guard = LRGuard(gate=False, monitor="train_loss", snapshot_every=10, confirm_steps=3)
    trainer = make_trainer([guard], max_steps=100, val_check_interval=50, check_val_every_n_epoch=None)
    trainer.fit(module)
    assert guard.check_on == "train_step"
    assert [(d.action, d.event.step) for d in guard.decisions] == [(Action.ROLLBACK, 60)] and finite(module)


def test_a_metric_that_nothing_in_the_run_logs_is_a_clear_error():
    guard = LRGuard(monitor="val_loss")  # the run has no validation loop, and training logs only train_loss
    match = r"monitor='val_loss' is not logged.*metrics are: train_loss.*no validation loop"
    with pytest.raises(ValueError, match=match):
        make_trainer([guard], max_steps=20).fit(ScriptedLossModule(decaying()))


def test_check_on_validation_in_a_run_without_validation_is_a_clear_error():
    guard = LRGuard(monitor="train_loss", check_on="validation")
    with pytest.raises(ValueError, match=r"check_on='validation'.*no validation loop.*check_on='train_step'"):
        make_trainer([guard], max_steps=20).fit(ScriptedLossModule(decaying()))


# -- a resume from the guard's stop checkpoint gets a fresh budget -----------------------------------------------
def test_resuming_from_the_guards_stop_checkpoint_gets_a_fresh_rollback_budget(tmp_path):
    trainer, guard, _ = diverging_run(tmp_path)
    stop = guard.decisions[-1]
    assert stop.action == Action.STOP and stop.checkpoint
    resumed_at = trainer.global_step
    bad = resumed_at + 10  # one bad batch before the resumed run has confirmed a snapshot of its own
    module = ScriptedLossModule(decaying(nan_at=(bad,)), optimizer="adam", lr=0.01)
    again = LRGuard(gate=False, snapshot_every=50, confirm_steps=3, max_rollbacks=2)
    make_trainer([again], max_steps=resumed_at + 30).fit(module, ckpt_path=stop.checkpoint)
    assert [(d.action, d.event.step) for d in again.decisions] == [(Action.ROLLBACK, bad)]
    assert finite(module)


# -- one guard object, two fits ------------------------------------------------------------------------------------
def falling(n=200):
    return [2.0 * 0.97**t for t in range(n)]  # down to 0.5% of where it started


def test_one_guard_used_for_two_fits_starts_each_fit_as_a_new_guard_would():
    spike = SpikeDetector(threshold=7.0)
    guard = LRGuard(spike=spike, snapshot_every=10)
    make_trainer([guard], max_steps=200).fit(ScriptedLossModule(falling()))
    assert guard.counts["rollbacks"] == 0

    second = ScriptedLossModule(falling())  # a fresh model: its loss starts 200x above the first run's best
    trainer = make_trainer([guard], max_steps=200)
    trainer.fit(second)
    fresh = LRGuard(spike=SpikeDetector(threshold=7.0), snapshot_every=10)
    make_trainer([fresh], max_steps=200).fit(ScriptedLossModule(falling()))

    assert trainer.global_step == 200 and finite(second)
    assert [d.message for d in guard.decisions] == [d.message for d in fresh.decisions]
    assert guard.counts == fresh.counts and guard.counts["rollbacks"] == 0
    assert guard.detectors["spike"] is spike and spike.threshold == 7.0  # the object's settings are kept
