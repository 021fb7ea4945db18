"""LR cuts persist under every scheduler: after a cut by f at step k, the LR at every later step is f times what
the user's schedule alone gives -- in plain torch and on a real Trainer, step and epoch intervals, several groups."""

import math

import pytest
import torch
from conftest import LRRecorder, make_trainer
from torch.optim import lr_scheduler as S

from lr_guard import LRGuard, PlateauDetector
from lr_guard.actions import (
    compose_with_scheduler,
    cut_lr,
    lr_factors,
    release_scheduler,
    set_lr_factors,
    set_min_lr,
)
from lr_guard.testing import ScriptedLossModule

SCHEDULERS = {
    "none": None,
    "StepLR": lambda o: S.StepLR(o, step_size=7, gamma=0.5),
    "MultiStepLR": lambda o: S.MultiStepLR(o, milestones=[20, 50], gamma=0.1),
    "ExponentialLR": lambda o: S.ExponentialLR(o, gamma=0.97),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=80, eta_min=1e-4),
    "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=10, T_mult=2, eta_min=1e-4),
    "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=[g["lr"] for g in o.param_groups], total_steps=200, pct_start=0.15),
    "LambdaLR": lambda o: S.LambdaLR(o, lambda e: 1.0 / (1.0 + 0.1 * e)),
    "SequentialLR(LinearLR, CosineAnnealingLR)": lambda o: S.SequentialLR(
        o, [S.LinearLR(o, start_factor=0.1, total_iters=10), S.CosineAnnealingLR(o, T_max=90)], milestones=[10]
    ),
    "ReduceLROnPlateau": lambda o: S.ReduceLROnPlateau(o, factor=0.5, patience=5),
}


def _optimizer(groups=2):
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(groups)]
    return torch.optim.SGD([{"params": [p], "lr": 0.1 / (i + 1)} for i, p in enumerate(params)], momentum=0.9)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_cut_persists_in_plain_torch(name):
    runs = []
    for guarded in (False, True):
        opt = _optimizer()
        sched = SCHEDULERS[name](opt) if SCHEDULERS[name] else None
        if guarded and sched is not None:
            compose_with_scheduler(sched)
        lrs = []
        for t in range(100):
            if guarded and t in (13, 40):
                cut_lr([opt], 0.5)
            lrs.append([g["lr"] for g in opt.param_groups])
            opt.step()
            if sched is not None:
                sched.step(1.0) if isinstance(sched, S.ReduceLROnPlateau) else sched.step()
        runs.append(lrs)
    for t, (ref, cut) in enumerate(zip(*runs, strict=True)):
        factor = 1.0 if t < 13 else 0.5 if t < 40 else 0.25
        assert cut == pytest.approx([factor * r for r in ref], rel=1e-12), t


def test_several_optimizers_and_schedulers_min_lr_and_eps():
    a, b = _optimizer(), _optimizer(1)
    sa, sb = S.StepLR(a, 5, 0.5), S.CosineAnnealingLR(b, 50)
    for s in (sa, sb):
        compose_with_scheduler(s)
    set_min_lr(a, [0.04, 0.0])
    changes = cut_lr([a, b], 0.25)
    assert [(c.optimizer, c.group) for c in changes] == [(0, 0), (0, 1), (1, 0)]
    assert a.param_groups[0]["lr"] == pytest.approx(0.04)  # floored at min_lr
    assert a.param_groups[1]["lr"] == pytest.approx(0.05 * 0.25)
    assert lr_factors([a, b]) == [[0.25, 0.25], [0.25]]
    for _ in range(5):
        a.step(), b.step(), sa.step(), sb.step()
    assert a.param_groups[0]["lr"] == pytest.approx(0.04)  # schedule 0.05, x0.25 = 0.0125 < floor 0.04
    assert a.param_groups[1]["lr"] == pytest.approx(0.025 * 0.25)
    tiny = _optimizer(1)
    tiny.param_groups[0]["lr"] = 1e-9
    assert cut_lr([tiny], 0.5, eps=1e-8) == [] and tiny.param_groups[0]["lr"] == 1e-9  # change below eps
    set_lr_factors([a, b], [[1.0, 1.0], [1.0]])
    assert a.param_groups[1]["lr"] == pytest.approx(0.025)


def test_composition_keeps_the_scheduler_state_dict_and_is_reversible():
    opt = _optimizer()
    sched = S.OneCycleLR(opt, max_lr=0.1, total_steps=50)
    keys = set(sched.state_dict())
    compose_with_scheduler(sched)
    compose_with_scheduler(sched)  # idempotent
    assert isinstance(sched, S.OneCycleLR) and type(sched).__name__ == "OneCycleLR"
    assert set(sched.state_dict()) == keys
    torch.save(sched.state_dict(), "/dev/null")
    release_scheduler(sched)
    assert type(sched) is S.OneCycleLR
    with pytest.raises(ValueError, match=r"factor must be in \(0, 1\), got 1.5"):
        cut_lr([opt], 1.5)
    with pytest.raises(ValueError, match="min_lr has 3 values but the optimizer has 2 param groups"):
        set_min_lr(opt, [0.1, 0.2, 0.3])
    with pytest.raises(TypeError, match="is not an LR scheduler"):
        compose_with_scheduler(object())


def _plateau_guard(**kwargs):
    """A guard whose only job is a plateau cut at step 40 on a constant loss, made at once (checked every step)."""
    kwargs.setdefault("check_every_n_steps", 1)
    return LRGuard(
        spike=False,
        oscillation=False,
        divergence=False,
        rollback=False,
        plateau=PlateauDetector(patience=39, window=1, noise_sigmas=0.0, warmup_steps=0, cooldown=10_000),
        **kwargs,
    )


def _lrs(scheduler, interval, guard, steps=120, param_groups=2):
    model = ScriptedLossModule([1.0], lr=0.1, scheduler=scheduler, interval=interval, param_groups=param_groups)
    recorder = LRRecorder()
    make_trainer([guard, recorder] if guard else [recorder], max_steps=steps).fit(model)
    return recorder.lrs


@pytest.mark.parametrize("interval", ["step", "epoch"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_cut_persists_on_a_trainer(name, interval):
    factory = SCHEDULERS[name]
    guard = _plateau_guard()
    ref, cut = _lrs(factory, interval, None), _lrs(factory, interval, guard)
    assert [d.step for d in guard.decisions] == [41] and guard.decisions[0].action.value == "lr_cut"
    assert guard.decisions[0].event.step == 40
    for step in ref:
        factor = 1.0 if step <= 40 else 0.5  # the loss of step 40 is read after its update: cut from 41
        assert cut[step] == pytest.approx([factor * lr for lr in ref[step]], rel=1e-9), (name, step)


def test_warmup_holds_a_plateau_cut_until_the_schedule_stops_rising():
    guard = _plateau_guard()
    warmup = lambda o: S.LinearLR(o, start_factor=0.01, total_iters=80)  # noqa: E731 - rising past step 40
    _lrs(warmup, "step", guard, steps=100)
    assert [d.action.value for d in guard.decisions] == ["held"]
    assert "still rising" in guard.decisions[0].message


def test_cumulative_factor_survives_checkpoint_resume(tmp_path):
    factory = SCHEDULERS["CosineAnnealingLR"]
    straight = _lrs(factory, "step", _plateau_guard())

    model = ScriptedLossModule([1.0], lr=0.1, scheduler=factory, param_groups=2)
    trainer = make_trainer([_plateau_guard()], max_steps=60)
    trainer.fit(model)
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    recorder = LRRecorder()
    resumed = ScriptedLossModule([1.0], lr=0.1, scheduler=factory, param_groups=2)
    make_trainer([_plateau_guard(), recorder], max_steps=120).fit(resumed, ckpt_path=path)
    assert min(recorder.lrs) == 60
    for step, lrs in recorder.lrs.items():
        assert lrs == pytest.approx(straight[step], rel=1e-9), step
    assert all(math.isfinite(x) for lrs in recorder.lrs.values() for x in lrs)
