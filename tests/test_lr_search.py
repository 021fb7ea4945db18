"""The upward LR search (``LRGuard(lr_search=True)``) on real Trainers: trials kept, rolled back exactly, never
at or above a failed LR, their discarded steps counted, checkpoints during a trial, and off by default."""

import copy
import math
import random

import pytest
import torch
from conftest import LRRecorder, make_trainer

from lr_guard import LRGuard
from lr_guard.events import Action
from lr_guard.testing import ScriptedLossModule, TinyRegressionModule

WINDOW = 10


# the trials alone (no in-run sweep first)
TRIALS = dict(
    lr_search=True, lr_search_window=WINDOW, lr_search_sweep_steps=0, snapshot_every=20, confirm_steps=3, verbose=False
)


def search_guard(**kwargs):
    """The trials alone, unless ``lr_search_sweep_steps`` is given."""
    return LRGuard(**{**TRIALS, **kwargs})


def too_low():
    """SGD far below an LR that trains this model well: the loss falls, slowly."""
    return TinyRegressionModule(lr=0.0003, batch_size=256)  # full batch: a smooth loss


def power_law_script(n=400, seed=0):
    """A loss that falls as a power law of the step whatever the LR (it is scripted): every trial fails."""
    rng = random.Random(seed)
    return [2.0 * (t + 1) ** -0.3 * math.exp(rng.gauss(0.0, 0.01)) for t in range(n)]


def state_recorder():
    """A callback that keeps, at the start of every step, the weights, the optimizer's state and the LR factor."""
    import pytorch_lightning as pl

    class Recorder(pl.Callback):
        def __init__(self):
            self.states = {}  # global step -> (weights, optimizer state, lr factor) the step starts from

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            optimizer = trainer.optimizers[0]
            state = (
                copy.deepcopy(pl_module.state_dict()),
                copy.deepcopy(optimizer.state_dict()["state"]),
                optimizer.param_groups[0].get("lr_guard_factor", 1.0),
            )
            self.states[trainer.global_step] = state  # Lightning's global step counts on through a rollback

    return Recorder()


def test_a_run_at_a_too_low_lr_raises_its_lr_and_keeps_it():
    plain = too_low()
    make_trainer([LRGuard(verbose=False)], max_steps=160).fit(plain)
    searched, guard = too_low(), search_guard()
    make_trainer([guard], max_steps=160).fit(searched)

    kept = [d for d in guard.decisions if d.action == Action.LR_KEEP]
    assert kept, [d.message for d in guard.decisions]
    assert guard.counts["lr_raises_kept"] == len(kept) and guard.counts["lr_trials"] >= len(kept)
    factor = searched.trainer.optimizers[0].param_groups[0]["lr_guard_factor"]
    assert factor >= 2.0  # the raise stays: the LR the optimizer steps with is above the schedule's own
    assert searched.full_loss() < 0.8 * plain.full_loss()


def test_a_failed_trial_is_rolled_back_exactly_to_its_snapshot():
    guard, recorder = search_guard(), state_recorder()
    model = ScriptedLossModule(power_law_script(), optimizer="adam", lr=0.01)
    make_trainer([guard, recorder], max_steps=120).fit(model)

    trials = [d for d in guard.decisions if d.action == Action.LR_TRIAL]
    rollbacks = [d for d in guard.decisions if d.action == Action.ROLLBACK]
    assert trials and rollbacks and len(rollbacks) == guard.counts["lr_trials_rolled_back"]
    assert not any(d.action == Action.LR_KEEP for d in guard.decisions)  # a scripted loss cannot fall faster
    assert guard.counts["rollbacks"] == 0  # the guard's own rollbacks are for divergence
    first = rollbacks[0]
    start, now = first.rollback_to, first.step
    assert start == trials[0].step and now > start
    weights, moments, factor = recorder.states[start]
    restored_weights, restored_moments, restored_factor = recorder.states[now]  # the first step after the rollback
    assert factor == trials[0].lr_factor == 2.0 and restored_factor == 1.0  # raised from the snapshot on; undone
    for name, value in weights.items():
        assert torch.equal(value, restored_weights[name]), name
    for index, state in moments.items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(restored_moments[index][key])), key


def test_no_trial_at_or_above_a_failed_trials_lr_and_discarded_steps_are_counted():
    guard = search_guard()
    model = ScriptedLossModule(power_law_script(), optimizer="adam", lr=0.01)
    trainer = make_trainer([guard], max_steps=400)
    trainer.fit(model)

    failed: list[float] = []
    trials = 0
    for decision in guard.decisions:
        if decision.action == Action.LR_TRIAL:
            trials += 1
            assert all(decision.lr_after < 0.9 * lr * (1 + 1e-9) for lr in failed), (decision.message, failed)
        elif decision.action == Action.ROLLBACK:
            failed.append(decision.lr_before)  # the trial's LR, just before it was rolled back
    assert trials >= 3 and len(failed) == trials  # raises of 2, then 1.8, 1.62... until under 1.25
    discarded = sum(d.step - d.rollback_to for d in guard.decisions if d.action == Action.ROLLBACK)
    assert guard.counts["discarded_trial_steps"] == discarded >= trials * WINDOW
    assert guard.state_dict()["counts"]["discarded_trial_steps"] == discarded
    assert "discarding" in guard.decisions[1].message


class SavingGuard(LRGuard):
    """Notes, at every checkpoint, whether an LR trial was under way."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.trial_at_save = {}

    def state_dict(self):
        if self._fitting:
            self.trial_at_save[self._run.trainer.global_step] = self.policy.search.trial is not None
        return super().state_dict()


def test_a_checkpoint_during_a_trial_holds_the_state_before_it_and_resumes_as_the_run_went_on(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    settings = TRIALS

    def module():
        return TinyRegressionModule(lr=0.002, batch_size=256)  # one batch per epoch: the data order cannot matter

    straight_guard = SavingGuard(**settings)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=7, save_top_k=-1, filename="{step}")
    straight = module()
    make_trainer([straight_guard, saver], max_steps=120, enable_checkpointing=True).fit(straight)
    during = [step for step, trial in straight_guard.trial_at_save.items() if trial]
    assert during, straight_guard.trial_at_save
    step = during[0]
    ended = [d for d in straight_guard.decisions if d.step == step and d.action in (Action.ROLLBACK, Action.LR_KEEP)]
    assert ended  # the trial was judged (or rolled back) before the file was written

    resumed_guard = SavingGuard(**settings)  # the same state_key
    resumed = module()
    again = ModelCheckpoint(dirpath=tmp_path / "resumed", every_n_train_steps=7, save_top_k=-1, filename="{step}")
    trainer = make_trainer([resumed_guard, again], max_steps=120, enable_checkpointing=True)
    trainer.fit(resumed, ckpt_path=str(tmp_path / f"step={step}.ckpt"))  # checkpoints at the same steps

    def key(d):
        return (d.event.step, d.action.value, d.rollback_to, round(d.lr_after, 12))

    after = [key(d) for d in straight_guard.decisions if d.step > step]
    assert [key(d) for d in resumed_guard.decisions] == after and after
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_lr_search_is_off_by_default_and_then_changes_nothing():
    guard, model = LRGuard(verbose=False), too_low()
    make_trainer([guard], max_steps=160).fit(model)
    assert guard.lr_search is False
    assert not any(d.action in (Action.LR_TRIAL, Action.LR_KEEP, Action.LR_UNDO) for d in guard.decisions)
    assert "lr_trials" not in guard.counts
    assert model.trainer.optimizers[0].param_groups[0].get("lr_guard_factor", 1.0) == 1.0
    # the search's other settings do nothing while it is off
    other, same = LRGuard(verbose=False, lr_search=False, lr_search_factor=4.0, lr_search_window=7), too_low()
    make_trainer([other], max_steps=160).fit(same)
    assert [d.message for d in other.decisions] == [d.message for d in guard.decisions]
    for a, b in zip(model.parameters(), same.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr_search": "yes"}, TypeError, r"lr_search must be True or False, got 'yes'"),
        ({"lr_search_factor": 1.0}, ValueError, r"lr_search_factor must be > 1.0, got 1.0"),
        ({"lr_search_factor": "2"}, TypeError, r"lr_search_factor must be a number, got '2'"),
        ({"lr_search_window": 5}, ValueError, r"lr_search_window must be >= 6, got 5"),
        ({"lr_search_window": 10.5}, TypeError, r"lr_search_window must be an int, got 10.5"),
        ({"lr_search_sweep_steps": 5}, ValueError, r"lr_search_sweep_steps must be 0 \(no sweep\) or >= 10 .*, got 5"),
        ({"lr_search_sweep_steps": 20.0}, TypeError, r"lr_search_sweep_steps must be an int, got 20.0"),
        ({"lr_search": True, "dry_run": True}, ValueError, r"lr_search=True cannot be combined with dry_run=True"),
        ({"lr_search": True, "rollback": False}, ValueError, r"lr_search=True cannot be combined with rollback=False"),
    ],
)
def test_lr_search_settings_are_validated_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        LRGuard(**kwargs)


def test_the_picture_of_a_run_marks_its_lr_trials_and_kept_raises():
    pytest.importorskip("matplotlib")
    from lr_guard.plot import draw_record
    from lr_guard.run_record import RunRecord

    guard, model = search_guard(), too_low()
    make_trainer([guard], max_steps=160).fit(model)
    record = RunRecord()
    for step in range(160):
        record.add(step, 1.0 / (step + 1), 3e-4)
    figure = draw_record(record, guard.decisions)
    gids = {a.get_gid() for ax in figure.axes for a in ax.get_children()}
    assert {"lr_guard:lr_trial", "lr_guard:lr_keep"} <= gids


# -- the in-run sweep: an LR range test from the starting state, then back to it ------------------------------
SWEEP = 30


def sweep_decisions(guard):
    sweeps = [d for d in guard.decisions if d.action == Action.LR_SWEEP]
    reads = [d for d in guard.decisions if d.action == Action.ROLLBACK and "range test saw" in d.message]
    return sweeps, reads


def test_the_sweep_raises_a_too_low_lr_at_once_and_restores_the_starting_state_exactly():
    plain = too_low()
    make_trainer([LRGuard(verbose=False)], max_steps=160).fit(plain)
    model, guard, recorder = too_low(), search_guard(lr_search_sweep_steps=SWEEP), state_recorder()
    make_trainer([guard, recorder], max_steps=160).fit(model)

    sweeps, reads = sweep_decisions(guard)
    assert len(sweeps) == 1 and sweeps[0].step == 0 and len(reads) == 1, [d.message for d in guard.decisions]
    read = reads[0]
    assert read.rollback_to == 0 and read.step <= SWEEP  # read as soon as its last step is in, not a batch later
    assert guard.counts["lr_sweeps"] == 1 and guard.counts["discarded_trial_steps"] >= read.step
    weights, moments, factor = recorder.states[0]
    restored_weights, restored_moments, restored_factor = recorder.states[read.step]
    for name, value in weights.items():
        assert torch.equal(value, restored_weights[name]), name
    assert moments == {} and restored_moments == {}  # SGD's momentum buffers: none before the first step
    assert factor == 1.0 and restored_factor > 5.0  # the LR is raised at once, from the start
    assert read.lr_after == pytest.approx(3e-4 * restored_factor)
    assert guard.counts["lr_trials"] == 0  # the sweep placed the peak: no trials after it
    assert model.full_loss() < 0.5 * plain.full_loss()


def test_the_sweep_lowers_a_too_high_lr_below_its_threshold_and_no_trial_follows():
    def too_high():
        return TinyRegressionModule(lr=2.0, batch_size=256)  # SGD with momentum: diverges at once

    plain = too_high()
    make_trainer([], max_steps=120).fit(plain)
    model, guard = too_high(), search_guard(lr_search_sweep_steps=SWEEP)
    make_trainer([guard], max_steps=120).fit(model)

    _, reads = sweep_decisions(guard)
    assert len(reads) == 1 and "threshold" in reads[0].message
    threshold = float(reads[0].message.split("threshold ")[1].split(",")[0].split(" ")[0])
    assert reads[0].lr_after < threshold < 2.0  # the peak lowered below the threshold the sweep found
    assert guard.counts["lr_trials"] == 0  # the sweep placed the peak: the trials are the net of one that did not
    assert not math.isfinite(plain.full_loss()) or plain.full_loss() > 1e3
    assert math.isfinite(model.full_loss()) and model.full_loss() < 0.1


def test_a_checkpoint_during_the_sweep_reads_it_first_and_resumes_as_the_run_went_on(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    settings = dict(
        lr_search=True, lr_search_window=WINDOW, lr_search_sweep_steps=SWEEP, snapshot_every=20, verbose=False
    )

    def module():
        return TinyRegressionModule(lr=0.002, batch_size=256)

    straight_guard = SavingGuard(**settings)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=7, save_top_k=-1, filename="{step}")
    straight = module()
    make_trainer([straight_guard, saver], max_steps=80, enable_checkpointing=True).fit(straight)
    _, reads = sweep_decisions(straight_guard)
    assert len(reads) == 1 and reads[0].step == 7  # the first checkpoint came during the sweep: read on 7 steps
    assert straight_guard.counts["lr_sweeps"] == 1

    resumed_guard = SavingGuard(**settings)
    resumed = module()
    again = ModelCheckpoint(dirpath=tmp_path / "resumed", every_n_train_steps=7, save_top_k=-1, filename="{step}")
    trainer = make_trainer([resumed_guard, again], max_steps=80, enable_checkpointing=True)
    trainer.fit(resumed, ckpt_path=str(tmp_path / "step=7.ckpt"))

    def key(d):
        return (d.event.step, d.action.value, d.rollback_to, round(d.lr_after, 12))

    assert not any(d.action == Action.LR_SWEEP for d in resumed_guard.decisions)  # its sweep is done
    after = [key(d) for d in straight_guard.decisions if d.step > 7]
    assert [key(d) for d in resumed_guard.decisions] == after
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_the_sweep_is_sized_on_the_peak_the_schedule_will_reach_and_leaves_the_schedule_to_replay(interval):
    def warm_up(optimizer):  # 1% of the LR, rising to all of it over 40 steps (one batch per epoch: 40 epochs)
        return torch.optim.lr_scheduler.LinearLR(optimizer, 0.01, 1.0, 40)

    model = TinyRegressionModule(lr=0.01, batch_size=256, scheduler=warm_up, interval=interval)
    guard, recorder = search_guard(lr_search_sweep_steps=SWEEP), LRRecorder()
    make_trainer([guard, recorder], max_steps=80).fit(model)

    sweeps, reads = sweep_decisions(guard)
    assert "the schedule's peak 0.01," in sweeps[0].message  # not the warm-up's first LR, 1e-4
    assert recorder.lrs[0][0] == pytest.approx(0.01 * 0.01)  # the sweep's first LR: 1/100 of the peak
    assert recorder.lrs[1][0] == pytest.approx(0.01 * 0.01 * 1e5 ** (1 / (SWEEP - 1)))  # to 1000x, exponentially
    restart = reads[0].step  # the first step after the rollback: the warm-up replays from its start
    factor = model.trainer.optimizers[0].param_groups[0]["lr_guard_factor"]
    assert recorder.lrs[restart][0] == pytest.approx(1e-4 * factor)
    assert recorder.lrs[restart + 10][0] == pytest.approx((0.01 + 0.99 * 10 / 40) * 0.01 * factor)
