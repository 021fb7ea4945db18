"""The guard beside what a user's own Lightning project already has: an LR written by hand in ``optimizer_step``,
schedulers that get pickled and deep-copied during fit, and ``EarlyStopping`` on the training loss."""

import copy
import math
import pickle

import pytest
import pytorch_lightning as pl
from conftest import LRRecorder, make_trainer
from pytorch_lightning.callbacks import EarlyStopping
from torch.optim import lr_scheduler as S

from lr_guard import Action, LRGuard
from lr_guard.testing import TinyRegressionModule


class ManualWarmupModule(TinyRegressionModule):
    """Lightning's documented manual warm-up: ``optimizer_step`` sets ``pg["lr"]`` by hand after every step."""

    warmup_steps = 100

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.written = {}  # the step an LR was written for (the next one) -> that LR

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer.step(closure=optimizer_closure)
        step = self.trainer.global_step  # the step just taken
        if step < self.warmup_steps:
            lr = min(1.0, (step + 1) / self.warmup_steps) * self.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            self.written[step + 1] = lr


def test_a_manual_warm_up_in_optimizer_step_composes_with_the_rollback_cut(caplog):
    caplog.set_level("INFO", logger="lr_guard")
    # the cut, not the warm-up's cap (warmup_cap_factor, tests/test_warmup_cap.py): what is tested is the factor
    guard = LRGuard(gate=False, plateau=False, snapshot_every=20, check_every_n_steps=1, warmup_cap_factor=None)
    recorder = LRRecorder()
    model = ManualWarmupModule(lr=0.05, poison_steps=[75])
    make_trainer([guard, recorder], max_steps=130).fit(model)

    rollbacks = [d for d in guard.decisions if d.action == Action.ROLLBACK]
    assert len(rollbacks) == 1 and rollbacks[0].lr_factor == 0.5  # a NaN during a warm-up cuts the LR
    rollback = rollbacks[0]
    assert rollback.lr_after < rollback.lr_before, rollback.message
    # the LR before is the warm-up's value for the next step; the rollback puts back the snapshot's, cut
    assert rollback.lr_before == pytest.approx(model.written[rollback.step])
    assert rollback.lr_after == pytest.approx(0.5 * model.written[rollback.rollback_to])
    for step, lrs in recorder.lrs.items():
        if step == rollback.step:  # the next step steps with the restored LR, cut
            assert lrs == pytest.approx([rollback.lr_after])
            continue
        factor = 0.5 if step > rollback.step else 1.0
        expected = model.written.get(min(step, ManualWarmupModule.warmup_steps), model.lr)
        assert lrs == pytest.approx([factor * expected]), step
    assert all(math.isfinite(p.detach().sum()) for p in model.parameters())
    told = [r.getMessage() for r in caplog.records if "set by hand" in r.getMessage()]
    assert len(told) == 1 and "applies its cuts on top" in told[0], told


class _PickleSchedulers(pl.Callback):
    """Pickles and deep-copies every scheduler during fit, as users and libraries do."""

    def __init__(self):
        self.copies = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 45:
            for config in trainer.lr_scheduler_configs:
                self.copies.append((pickle.loads(pickle.dumps(config.scheduler)), config.scheduler))
                self.copies.append((copy.deepcopy(config.scheduler), config.scheduler))


@pytest.mark.parametrize(
    "factory",
    [
        lambda o: S.StepLR(o, step_size=7, gamma=0.5),
        lambda o: S.OneCycleLR(o, max_lr=0.05, total_steps=200),
        lambda o: S.ReduceLROnPlateau(o, factor=0.5, patience=5),
    ],
    ids=["StepLR", "OneCycleLR", "ReduceLROnPlateau"],
)
def test_a_scheduler_pickles_and_deep_copies_during_fit_and_its_copy_composes_too(factory):
    guard = LRGuard(
        gate=False, plateau=False, check_every_n_steps=1, keep_lr_on_bad_batch=False, warmup_cap_factor=None
    )
    copier = _PickleSchedulers()
    model = TinyRegressionModule(lr=0.05, scheduler=factory, poison_steps=[30])
    make_trainer([guard, copier], max_steps=60).fit(model)
    assert [d.action for d in guard.decisions] == [Action.ROLLBACK]
    assert len(copier.copies) == 2
    for clone, original in copier.copies:
        assert type(clone).__name__ == type(original).__name__ and isinstance(clone, type(original).__mro__[1])
        assert clone.state_dict().keys() == original.state_dict().keys()
        # the copy steps its own optimizer on the unscaled schedule, with the guard's factor on top, as the original
        group = clone.optimizer.param_groups[0]
        factor = group.get("lr_guard_factor", 1.0)
        clone.step(1.0) if isinstance(clone, S.ReduceLROnPlateau) else clone.step()
        assert getattr(type(clone), "_lr_guard_composed", False)
        assert factor == 0.5 and group["lr"] == pytest.approx(factor * group["lr_guard_unscaled"])


def test_early_stopping_on_the_training_loss_does_not_stop_a_run_the_guard_rescued():
    # 16 steps an epoch: the NaN at step 45 falls in epoch 2's last check window, read at the epoch's end
    guard = LRGuard(gate=False, plateau=False)
    stopper = EarlyStopping(monitor="train_loss", patience=100)
    model = TinyRegressionModule(lr=0.05, poison_steps=[45])
    trainer = make_trainer([guard, stopper], max_steps=-1, max_epochs=8)
    trainer.fit(model)
    assert [(d.action, d.event.step) for d in guard.decisions] == [(Action.ROLLBACK, 45)]
    assert trainer.current_epoch == 8 and stopper.stopped_epoch == 0, stopper.stopping_reason_message
    assert math.isfinite(float(trainer.callback_metrics["train_loss"]))


def test_after_a_rollback_the_callbacks_read_the_metrics_of_the_restored_weights():
    seen = {}

    class Reader(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen[trainer.current_epoch] = float(trainer.callback_metrics["train_loss"])

    guard = LRGuard(gate=False, plateau=False, snapshot_every=20)
    model = TinyRegressionModule(lr=0.05, poison_steps=[47])  # the last step of epoch 2
    logged = {}

    class Logged(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged[trainer.global_step - 1] = float(trainer.callback_metrics["train_loss"])

    make_trainer([guard, Logged(), Reader()], max_steps=-1, max_epochs=4).fit(model)
    [rollback] = [d for d in guard.decisions if d.action == Action.ROLLBACK]
    assert rollback.event.step == 47 and math.isnan(logged[47])
    # what the callbacks read after it is the loss logged at the restored step: the loss of the restored weights
    assert seen[2] == logged[rollback.rollback_to]
