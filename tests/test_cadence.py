"""The guard's defaults fit the cadence it is fed at: per step, per validation, and runs bounded by epochs."""

import math

import pytorch_lightning as pl
import torch
from conftest import make_trainer
from torch.utils.data import DataLoader

from lr_guard import LRGuard, PlateauLRReducer
from lr_guard.data import load_curve
from lr_guard.events import Action
from lr_guard.testing import ScriptedLossModule, TinyRegressionModule


class Validated(TinyRegressionModule):
    """16 steps an epoch (256 samples, batches of 16), a validation run after each: ``val_loss`` is the loss on
    the training data, or ``flat`` when given (a validation loss that no longer improves)."""

    def __init__(self, flat: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.flat = flat

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=64)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("val_loss", torch.tensor(self.flat) if self.flat is not None else loss)


def test_check_on_validation_confirms_a_snapshot_at_the_next_validation_not_ten_validations_later():
    # NaN inputs at step 100 (epoch 6 of 16-step epochs): the NaN val_loss of that epoch rolls back. Before, a
    # snapshot needed ten healthy validations to count as good, so the rollback went back to step 0.
    module = Validated(poison_steps=[100], lr=0.05)
    guard = LRGuard(gate=False, monitor="val_loss", check_on="validation", snapshot_every=16, verbose=False)
    make_trainer([guard], max_steps=160, num_sanity_val_steps=0).fit(module)
    rollbacks = [d for d in guard.decisions if d.action == Action.ROLLBACK]
    assert len(rollbacks) == 1, [d.message for d in guard.decisions]
    assert rollbacks[0].event.step == 112 and 64 <= rollbacks[0].rollback_to < 112
    assert all(math.isfinite(float(p.sum())) for p in module.parameters())


def test_plateau_lr_reducer_on_val_loss_cuts_after_five_validations_without_improvement():
    # A val_loss flat from the first validation: the per-validation default (torch's rule with patience 5, an
    # improvement beyond half the run's typical change between validations) cuts at the 7th. Before, torch's own
    # defaults (patience 10, 1e-4) cut at the 12th, and never before the hand-set decay on the per-epoch ResNet-110.
    module = Validated(flat=1.0, lr=0.01)
    reducer = PlateauLRReducer(monitor="val_loss", verbose=False)
    make_trainer([reducer], max_epochs=40, max_steps=-1, num_sanity_val_steps=0).fit(module)
    cuts = [d for d in reducer.decisions if d.action == Action.LR_CUT]
    assert cuts, [d.message for d in reducer.decisions]
    assert cuts[0].event.step == 7 * 16  # the 7th validation: 6 without improvement after the first
    plateau = reducer.detectors["plateau"]
    assert (plateau.patience, plateau.threshold, plateau.window, plateau.noise_sigmas) == (5, 0.0, 1, 0.5)
    assert module.trainer.optimizers[0].param_groups[0]["lr"] < 0.01


class SlowlyImproving(Validated):
    """``val_loss`` improves by 0.15% a validation with a little noise (a long healthy run late in its schedule)."""

    def validation_step(self, batch, batch_idx):
        wobble = 0.0003 * ((7 * self.current_epoch) % 5 - 2)
        self.log("val_loss", torch.tensor(2.0 * 0.9985**self.current_epoch * (1.0 + wobble)))


def test_a_slowly_improving_val_loss_gets_no_plateau_cut_per_validation():
    # 0.75% better every 5 validations, each one beyond its noise: the run's own pace. Before, the per-validation
    # default (torch's rule with a fixed relative 1e-2) cut the LR at the 7th validation and every 6th after it.
    module = SlowlyImproving(lr=0.01)
    reducer = PlateauLRReducer(monitor="val_loss", verbose=False)
    make_trainer([reducer], max_epochs=40, max_steps=-1, num_sanity_val_steps=0).fit(module)
    assert not [d for d in reducer.decisions if d.action == Action.LR_CUT], [d.message for d in reducer.decisions]
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == 0.01


def test_torch_reduce_lr_on_plateau_agrees_on_the_same_flat_validation_loss():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    torch_rule = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    first_cut = next(epoch for epoch in range(1, 40) if (torch_rule.step(1.0), opt.param_groups[0]["lr"])[1] < 0.01)
    assert first_cut == 12


class _StopAtFirstStep(pl.Callback):
    def __init__(self, guard):
        self.guard, self.patience = guard, None

    def on_train_batch_end(self, trainer, *args):
        self.patience = self.guard.detectors["plateau"].max_patience
        trainer.should_stop = True


def test_a_run_bounded_by_max_epochs_sizes_the_plateau_detector_as_the_same_max_steps_run():
    # 16 steps an epoch: max_epochs=250 is 4000 steps, as max_steps=4000 (patience at most a quarter of the run:
    # 1000). Before, max_epochs runs kept the default.
    sizes = {}
    for bound in ({"max_epochs": 250, "max_steps": -1}, {"max_steps": 4000}):
        guard = LRGuard(verbose=False)
        probe = _StopAtFirstStep(guard)
        make_trainer([guard, probe], **bound).fit(TinyRegressionModule())
        sizes[tuple(bound)] = probe.patience
    assert sizes == {("max_epochs", "max_steps"): 1000, ("max_steps",): 1000}


def test_a_monitored_validation_metric_gets_validation_sized_detectors_when_the_first_step_shows_it():
    guard = LRGuard(monitor="val_loss", verbose=False)  # check_on chosen at the first step: validation
    make_trainer([guard], max_steps=32, num_sanity_val_steps=0).fit(Validated())
    assert guard.watch_on == "validation"
    assert guard.detectors["plateau"].patience == 5 and guard.detectors["plateau"].window == 1
    assert guard.detectors["divergence"].trend_window == 0


def test_a_resumed_run_bounded_by_max_epochs_restores_the_sized_plateau_state_without_a_warning(tmp_path, recwarn):
    first = LRGuard(verbose=False)
    trainer = make_trainer([first], max_epochs=250, max_steps=-1, limit_train_batches=16)
    probe = _StopAtFirstStep(first)
    trainer.callbacks.append(probe)
    module = TinyRegressionModule()
    trainer.fit(module)
    path = str(tmp_path / "mid.ckpt")
    trainer.save_checkpoint(path)
    saved = first.detectors["plateau"].state_dict()
    second = LRGuard(verbose=False)
    probe2 = _StopAtFirstStep(second)
    resumed = make_trainer([second, probe2], max_epochs=250, max_steps=-1)
    resumed.fit(TinyRegressionModule(), ckpt_path=path)
    assert probe2.patience == 1000
    assert not [w for w in recwarn if "other settings" in str(w.message)]
    assert second.detectors["plateau"].state_dict()["state"]["_n"] >= saved["state"]["_n"]


def test_a_run_whose_validation_never_comes_says_the_guard_watched_nothing(caplog):
    guard = LRGuard(monitor="val_loss", check_on="validation", verbose=False)
    make_trainer([guard], max_steps=20, check_val_every_n_epoch=10, num_sanity_val_steps=0).fit(Validated())
    warned = [r.getMessage() for r in caplog.records if r.name == "lr_guard" and r.levelname == "WARNING"]
    assert any("none ran in these 20 steps, so the guard watched nothing" in m for m in warned), warned
    caplog.clear()
    validated = LRGuard(monitor="val_loss", check_on="validation", verbose=False)
    make_trainer([validated], max_steps=32, num_sanity_val_steps=0).fit(Validated())
    assert not [r for r in caplog.records if "watched nothing" in r.getMessage()]


def test_a_slowly_improving_heavy_tailed_lm_loss_gets_no_plateau_cut_per_step():
    # The first 3,000 steps of the noisy 19k-step GPT-2 log (outliers of +1 nat, still improving) as the training
    # loss of a 3,000-step run. Before, the run-sized default (patience 300, window 100) cut the LR at step 2,214
    # and 2,660; the patience is now a third of the run seen so far (at most a quarter of the run), over a level
    # of up to 1,000 values, so the slow progress beats the noise margin.
    script = [loss for _, loss in load_curve("lm_gpt2_124m_scaleshortcuts_spikes")[:3000]]
    module = ScriptedLossModule(script, lr=0.01)
    reducer = PlateauLRReducer(verbose=False)
    make_trainer([reducer], max_steps=3000).fit(module)
    assert not [d for d in reducer.decisions if d.action == Action.LR_CUT], [d.message for d in reducer.decisions]
    assert reducer.detectors["plateau"].max_patience == 750


def test_a_run_stuck_at_its_starting_level_is_cut_after_a_third_of_the_run():
    # A run that never learns (the loss flat at its first value, within noise): the plateau comes once a third of
    # the steps seen so far have passed without improvement, not after a fixed count.
    script = [2.0 + 0.01 * ((7 * t) % 5 - 2) for t in range(900)]
    module = ScriptedLossModule(script, lr=0.01)
    reducer = PlateauLRReducer(verbose=False)
    make_trainer([reducer], max_steps=900).fit(module)
    plateaus = [d.event.step for d in reducer.decisions if d.event.kind.value == "plateau"]
    assert plateaus and 140 <= plateaus[0] <= 250, [d.message for d in reducer.decisions]
