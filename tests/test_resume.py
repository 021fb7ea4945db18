"""Resume by behaviour: interrupted at a checkpoint and resumed = never interrupted (events, LRs, weights)."""

import math
import warnings

import pytest
import torch
from conftest import LRRecorder, make_trainer
from torch.optim import lr_scheduler as S

from lr_guard import LRGuard, PlateauDetector
from lr_guard.testing import ScriptedLossModule

# Full-batch training (one batch per epoch): Lightning's own resume replays a batch when a non-resumable
# DataLoader stops on an epoch boundary (measured: the plain Trainer, no guard, trains batch 0 twice), so the
# comparison uses data whose order cannot matter; what is tested is the guard's state, not Lightning's loader.


def loss_script():
    s = [2.0 / (1.0 + 0.05 * t) for t in range(40)]
    s += [s[-1]] * 40  # a plateau from step 40: a cut at step 61
    s += [s[-1] * (1 - 0.01 * t) for t in range(40)]
    s[90] = math.nan  # a rollback at step 90
    return s


def guard():
    return LRGuard(
        gate=False,
        snapshot_every=8,
        confirm_steps=3,
        plateau=PlateauDetector(patience=20, window=1, noise_sigmas=0, warmup_steps=0, cooldown=1000),
    )


def module():
    return ScriptedLossModule(
        loss_script(), optimizer="adam", lr=0.01, batch_size=256, scheduler=lambda o: S.CosineAnnealingLR(o, T_max=200)
    )


def run(max_steps, g, recorder, ckpt_path=None, m=None):
    m = m or module()
    trainer = make_trainer([g, recorder], max_steps=max_steps)
    trainer.fit(m, ckpt_path=ckpt_path)
    return trainer, m


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path):
    straight_guard, straight_lrs = guard(), LRRecorder()
    _, straight = run(112, straight_guard, straight_lrs)

    first_guard = guard()
    trainer, _ = run(48, first_guard, LRRecorder())
    path = tmp_path / "step48.ckpt"
    trainer.save_checkpoint(path)
    resumed_guard, resumed_lrs = guard(), LRRecorder()
    _, resumed = run(112, resumed_guard, resumed_lrs, ckpt_path=path)

    def key(d):
        return (d.event.kind.value, d.event.step, d.action.value, d.rollback_to, round(d.lr_after, 12))

    assert [key(d) for d in straight_guard.decisions] == [
        key(d) for d in first_guard.decisions + resumed_guard.decisions
    ]
    assert [d.action.value for d in straight_guard.decisions] == ["lr_cut", "rollback"]
    for step, lrs in resumed_lrs.lrs.items():
        assert lrs == straight_lrs.lrs[step], step
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert resumed_guard.counts == straight_guard.counts


def test_checkpoint_without_the_guard_or_with_other_settings_loads_with_a_warning(tmp_path):
    trainer = make_trainer([], max_steps=16)
    trainer.fit(module())
    path = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(path)
    g = guard()
    run(32, g, LRRecorder(), ckpt_path=path)  # no guard state in it: nothing to load, no error
    assert g.counts["rollbacks"] == 0

    guarded = make_trainer([guard()], max_steps=16)
    guarded.fit(module())
    path2 = tmp_path / "guarded.ckpt"
    guarded.save_checkpoint(path2)
    other = LRGuard(snapshot_every=8, plateau=PlateauDetector(patience=5), spike=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(32, other, LRRecorder(), ckpt_path=path2)
    messages = [str(w.message) for w in caught]
    assert any("loading state saved with other settings" in m and "patience: saved 20, now 5" in m for m in messages)
    assert other.detectors["plateau"].n_updates > 16  # the detector's counters did carry over


def test_state_dict_is_plain_and_keyed_per_guard():
    g = guard()
    state = g.state_dict()
    assert state["version"] == 1 and set(state) >= {"detectors", "counts", "incident_rollbacks", "skip_left"}
    torch.save(state, "/dev/null")
    assert LRGuard(monitor="val_loss").state_key != LRGuard().state_key
    with pytest.raises(ValueError, match="monitor must be None .* or a metric name, got 3"):
        LRGuard(monitor=3)  # type: ignore[arg-type]
