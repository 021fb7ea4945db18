"""``dry_run=True``: every decision logged as it would be taken, and nothing changed."""

import os

import pytest
import torch
from conftest import LRRecorder, make_trainer

from lr_guard import DivergenceRollback, LRGuard, PlateauDetector, PlateauLRReducer
from lr_guard.events import Action
from lr_guard.testing import ScriptedLossModule


def _script():
    script = [1.0 - 0.01 * t + 0.002 * (t % 3) for t in range(40)] + [0.62 + 0.002 * (t % 3) for t in range(40)]
    for step in (50, 57, 64, 71):  # divergence that comes back: rollbacks, then a stop
        script[step : step + 3] = [100.0] * 3  # a blow-up that stays up (the scripted loss keeps its values)
    return script


def _fit(callbacks, max_steps=80):
    torch.manual_seed(0)
    recorder = LRRecorder()
    module = ScriptedLossModule(_script())
    trainer = make_trainer([*callbacks, recorder], max_steps=max_steps)
    trainer.fit(module)
    return trainer, module, recorder.lrs


def test_a_dry_run_logs_what_it_would_do_and_changes_nothing():
    plateau = PlateauDetector(patience=8, window=1, noise_sigmas=0, warmup_steps=0)
    guard = LRGuard(
        plateau=plateau, snapshot_every=10, check_every_n_steps=1, skip_batches=2, max_rollbacks=2, dry_run=True
    )
    trainer, guarded, lrs = _fit([guard])
    _, plain, plain_lrs = _fit([])
    assert lrs == plain_lrs  # no LR cut, no rollback's factor
    for a, b in zip(guarded.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b) or torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)  # no rollback, no skip
    assert trainer.global_step == 80 and not trainer.should_stop  # no stop
    assert not os.path.exists(os.path.join(trainer.default_root_dir, "lr_guard_checkpoints"))
    assert len(guard._store) == 0  # no snapshot copied
    actions = [d.action for d in guard.decisions]
    assert {Action.LR_CUT, Action.ROLLBACK, Action.STOP} <= set(actions)
    assert all(d.dry_run for d in guard.decisions)
    cut = next(d for d in guard.decisions if d.action == Action.LR_CUT)
    assert "-- would cut the LR: lr 0.05 -> 0.025 (x0.5)" in cut.message
    rollback = next(d for d in guard.decisions if d.action == Action.ROLLBACK)
    assert "-- would roll back to step " in rollback.message and "rolled back" not in rollback.message
    assert "would stop training" in guard.decisions[-1].message
    # the policy ran as live: its counts are what the live guard would have counted
    assert guard.counts["rollbacks"] == actions.count(Action.ROLLBACK) and guard.counts["lr_cuts"] >= 1


def test_a_dry_run_says_what_the_live_guard_does_where_the_weights_do_not_tell_them_apart():
    # the scripted loss is the same whatever the weights: the live guard's run and the dry run see the same values
    def run(dry_run):
        plateau = PlateauDetector(patience=8, window=1, noise_sigmas=0, warmup_steps=0)
        guard = LRGuard(
            gate=False,
            plateau=plateau,
            snapshot_every=10,
            check_every_n_steps=1,
            skip_batches=2,
            max_rollbacks=2,
            dry_run=dry_run,
        )
        _fit([guard])
        # a stop's LR after is the restored state's, which a dry run cannot know without restoring it
        seen = [
            (d.event.step, d.action, d.rollback_to, d.lr_before, None if d.action == Action.STOP else d.lr_after)
            for d in guard.decisions
        ]
        return seen, dict(guard.counts)

    assert run(dry_run=True) == run(dry_run=False)


def test_the_single_job_callbacks_take_dry_run():
    reducer = PlateauLRReducer(plateau=PlateauDetector(patience=8, window=1, noise_sigmas=0, warmup_steps=0))
    reducer.dry_run = True
    rollback = DivergenceRollback(snapshot_every=10, dry_run=True)
    _, _, lrs = _fit([reducer, rollback])
    _, _, plain_lrs = _fit([])
    assert lrs == plain_lrs
    assert any(d.action == Action.LR_CUT and "would cut" in d.message for d in reducer.decisions)
    assert any(d.action == Action.ROLLBACK and "would roll back" in d.message for d in rollback.decisions)


def test_dry_run_is_validated_and_refused_with_the_gate():
    with pytest.raises(TypeError, match=r"dry_run must be True or False, got 'yes'"):
        LRGuard(dry_run="yes")
    with pytest.raises(ValueError, match=r"dry_run=True cannot be combined with gate=True"):
        LRGuard(dry_run=True, gate=True)
