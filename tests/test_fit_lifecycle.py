"""The guard over a whole `fit` on real Trainers: where it watches, how its stop ends the run, what a resume from
its stop checkpoint gets, and what one guard object keeps from one fit to the next."""

import math

import pytest
import torch
from conftest import make_trainer

from lr_guard import Action, LRGuard
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
    guard = LRGuard(snapshot_every=10, confirm_steps=3, max_rollbacks=2, checkpoint_dir=str(tmp_path))
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
