"""A run whose parts change while it trains: lazy parameters materialised by the first forward pass, a parameter
registered mid-run, schedulers swapped by Lightning's StochasticWeightAveraging. Each on a real Trainer."""

import math

import pytest
import torch
from conftest import LRRecorder, make_trainer
from pytorch_lightning.callbacks import StochasticWeightAveraging
from torch import nn

from lr_guard import DivergenceRollback, LRGuard
from lr_guard.events import Action
from lr_guard.testing import ScriptedLossModule


def decaying(n=200, nan_at=()):
    script = [1.0 - 0.004 * i for i in range(n)]
    for step in nan_at:
        script[step] = math.nan
    return script


def rollbacks(guard):
    return [d.rollback_to for d in guard.decisions if d.action == Action.ROLLBACK]


# ---------------------------------------------------------------- StochasticWeightAveraging
# 256 samples in batches of 16: 16 steps an epoch. SWA starts averaging (and swaps in its SWALR) at the start of
# epoch swa_epoch_start - 1 = 1, step 16; the snapshot of step 16 is taken at the end of epoch 0, before the swap.


def swa_run(nan_at, scheduler):
    guard = DivergenceRollback(snapshot_every=8, confirm_steps=2, check_every_n_steps=1, gate=False)
    recorder = LRRecorder()
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2, annealing_epochs=2)
    module = ScriptedLossModule(decaying(nan_at=nan_at), scheduler=scheduler, interval="epoch")
    trainer = make_trainer([guard, swa, recorder], max_steps=-1, max_epochs=4)
    trainer.fit(module)
    return guard, recorder, trainer


def step_lr(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)


@pytest.mark.parametrize("scheduler", [None, step_lr], ids=["no_scheduler", "user_steplr"])
def test_rollback_across_swa_epoch_start_restores_schedulers_by_identity(scheduler):
    clean_guard, clean, _ = swa_run((), scheduler)
    guard, faulty, trainer = swa_run((20,), scheduler)
    assert rollbacks(clean_guard) == []
    assert rollbacks(guard) == [16]  # back to before SWA swapped in its SWALR
    swalr = trainer.lr_scheduler_configs[0].scheduler
    assert type(swalr).__name__ == "SWALR"
    assert "gamma" not in swalr.state_dict()  # no StepLR state loaded into SWA's scheduler
    # the rollback restores the LR of step 16 and leaves SWALR's own state alone: the same LRs as a clean run
    assert faulty.lrs.keys() == clean.lrs.keys()
    for step in clean.lrs:
        assert faulty.lrs[step] == pytest.approx(clean.lrs[step], rel=1e-12), step


def test_schedulers_that_come_and_go_compose_with_the_cuts_and_are_left_as_they_were():
    # A NaN at step 40, after SWA swapped its SWALR in at step 16: the rollback's cut is carried by SWALR (it
    # appeared during the run); after fit both SWALR and the user's StepLR it replaced are their own classes again.
    guard = LRGuard(gate=False, snapshot_every=8, confirm_steps=2, check_every_n_steps=1, keep_lr_on_bad_batch=False)
    recorder = LRRecorder()
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2, annealing_epochs=2)
    module = ScriptedLossModule(decaying(nan_at=(40,)), scheduler=step_lr, interval="epoch")
    trainer = make_trainer([guard, swa, recorder], max_steps=-1, max_epochs=4)
    user_steplr = {}

    class Keep(LRRecorder):
        def on_train_start(self, trainer, pl_module):
            user_steplr["it"] = trainer.lr_scheduler_configs[0].scheduler

    trainer.callbacks.append(Keep())
    trainer.fit(module)
    assert [d.rollback_to for d in guard.decisions if d.action == Action.ROLLBACK] == [32]
    swalr = trainer.lr_scheduler_configs[0].scheduler
    assert type(swalr) is torch.optim.swa_utils.SWALR
    assert type(user_steplr["it"]) is torch.optim.lr_scheduler.StepLR  # swapped out by SWA, released all the same
    # SWALR anneals to swa_lrs=0.01 by epoch 3 and holds it: after the cut the LR stepped is half of that
    assert recorder.lrs[max(recorder.lrs)] == [pytest.approx(0.005)]


# ---------------------------------------------------------------- parameters that appear during the run
class LazyScriptedModule(ScriptedLossModule):
    """The scripted module with an ``nn.LazyLinear`` first layer: its weights exist after the first forward."""

    def __init__(self, script, **kwargs):
        super().__init__(script, **kwargs)
        self.net[0] = nn.LazyLinear(16)


def test_lazy_module_trains_and_rolls_back_to_its_materialised_start():
    seen = {}

    class FirstWeights(LRRecorder):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 0:
                seen["start"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    guard = LRGuard(
        gate=False, snapshot_every=50, confirm_steps=2, check_every_n_steps=1, plateau=False, oscillation=False
    )
    restored = {}

    class AfterRollback(LRRecorder):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if rollbacks(guard) and not restored:
                restored.update({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    module = LazyScriptedModule(decaying(nan_at=(5,)))
    make_trainer([guard, FirstWeights(), AfterRollback()], max_steps=12).fit(module)
    assert rollbacks(guard) == [0]
    assert restored.keys() == seen["start"].keys()
    for key, value in seen["start"].items():  # the state before the first update, weights materialised
        assert torch.equal(restored[key], value), key
    assert all(torch.isfinite(p).all() for p in module.parameters())


class GrowingModule(ScriptedLossModule):
    """Registers a new parameter at step 10, mid-run, and uses it from then on."""

    def training_step(self, batch, batch_idx):
        if self.global_step == 10 and not hasattr(self, "late"):
            self.late = nn.Parameter(torch.ones(()))
        loss = super().training_step(batch, batch_idx)
        return loss * self.late if hasattr(self, "late") else loss


def test_rollback_past_a_parameter_registered_mid_run_says_what_happened():
    guard = DivergenceRollback(gate=False, snapshot_every=4, confirm_steps=2, check_every_n_steps=1)
    trainer = make_trainer([guard], max_steps=30)
    with pytest.raises(RuntimeError, match=r"roll back to step 8.*'late'.*registered after.*before training starts"):
        trainer.fit(GrowingModule(decaying(nan_at=(11,))))
