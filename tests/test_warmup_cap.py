"""The warm-up as a range test: a rollback whose trouble began while the schedule's LR rose caps the LR just below
where the trouble began (``warmup_cap_factor``), instead of halving the whole schedule."""

import math

import pytest
import torch
from conftest import make_trainer
from pytorch_lightning import Callback
from torch.optim import lr_scheduler as S

from lr_guard import LRGuard
from lr_guard.actions.lr import cut_lr, lr_caps, set_lr_caps, set_min_lr
from lr_guard.testing import ScriptedLossModule

WARMUP, STEPS, LR = 100, 200, 0.01
SPIKE, BLOW_UP, SECOND = 40, 46, 78  # the first sign, the blow-up it leads to, a failure under the cap
STAYS_UP = 2  # a blow-up counts once the values after it stay up (one bad batch comes back at once)


class ScheduleRecorder(Callback):
    """The LR each optimizer step uses and the schedule's own LR beside it (the guard's cuts and cap left out)."""

    def __init__(self):
        self.lr, self.schedule = {}, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        group = optimizer.param_groups[0]
        self.lr[trainer.global_step] = group["lr"]
        self.schedule[trainer.global_step] = group.get("lr_guard_unscaled", group["lr"])


def warmup_cosine(optimizer):
    return S.SequentialLR(
        optimizer,
        [S.LinearLR(optimizer, 0.01, 1.0, WARMUP), S.CosineAnnealingLR(optimizer, STEPS - WARMUP)],
        [WARMUP],
    )


def script(second_failure=False, blow_up=BLOW_UP):
    values = [2.0 / (1.0 + 0.05 * t) for t in range(STEPS)]
    values[SPIKE] *= 4  # the first sign of trouble: a spike, logged
    values[blow_up : blow_up + STAYS_UP + 1] = [40.0] * (STAYS_UP + 1)  # the blow-up it leads to: the rollback
    if second_failure:
        values[SECOND : SECOND + STAYS_UP + 1] = [40.0] * (STAYS_UP + 1)  # under the cap, while the LR still rises
    return values


def module(second_failure=False, scheduler=warmup_cosine, blow_up=BLOW_UP):
    return ScriptedLossModule(
        script(second_failure, blow_up), optimizer="adam", lr=LR, batch_size=256, scheduler=scheduler
    )  # one batch per epoch: a resumed run sees the batches of the uninterrupted one


def guard(**kwargs):
    return LRGuard(
        **{"gate": False, "snapshot_every": 8, "confirm_steps": 3, "plateau": False, "verbose": False, **kwargs}
    )


def scheduled_lrs(steps):
    """The scheduler's own LR at each of its steps, from a fresh optimizer."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    scheduler, lrs = warmup_cosine(optimizer), []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def rollbacks(g):
    return [d for d in g.decisions if d.action.value == "rollback"]


def test_a_warm_up_past_the_threshold_is_capped_just_below_where_the_trouble_began():
    # a cap of 0.3 (not the default 0.1): this short run's cosine then passes under the cap before it ends
    g, recorder = guard(warmup_cap_factor=0.3), ScheduleRecorder()
    make_trainer([g, recorder], max_steps=STEPS).fit(module())
    (rollback,) = rollbacks(g)
    # the trouble began at the spike (step 40), not at the blow-up that confirmed it (step 46, confirmed at 48)
    assert rollback.event.step == BLOW_UP + STAYS_UP and rollback.trouble_step == SPIKE
    assert rollback.trouble_lr == recorder.lr[SPIKE]
    assert rollback.lr_cap == pytest.approx(g.warmup_cap_factor * recorder.lr[SPIKE])
    assert rollback.lr_factor == 1.0  # the schedule is not halved
    cap = rollback.lr_cap
    assert f"capped the peak at {cap:.3g} (trouble began at LR {recorder.lr[SPIKE]:.3g}, step {SPIKE})" in str(rollback)
    # the scheduler is left intact: after the rollback it replays its own LRs from the restored step
    reference = scheduled_lrs(STEPS)
    after = [s for s in recorder.lr if s >= rollback.step]
    for step in after:
        assert recorder.schedule[step] == pytest.approx(reference[step - rollback.step + rollback.rollback_to])
        # ... and the LR used is min(schedule, cap): the warm-up rises to the cap, the cosine later passes under it
        assert recorder.lr[step] == pytest.approx(min(recorder.schedule[step], cap))
    assert any(recorder.schedule[s] > 1.5 * cap and recorder.lr[s] == pytest.approx(cap) for s in after)
    assert any(recorder.schedule[s] < cap and recorder.lr[s] == recorder.schedule[s] for s in after)
    assert g.policy.capped


def test_a_second_failure_under_the_cap_cuts_cap_and_schedule_as_before():
    g, recorder = guard(), ScheduleRecorder()
    make_trainer([g, recorder], max_steps=STEPS).fit(module(second_failure=True))
    first, second = rollbacks(g)
    assert second.event.step == SECOND + STAYS_UP and second.lr_cap is None and second.lr_factor == 0.5
    assert "capped" not in str(second)
    cap = first.lr_cap
    for step in (s for s in recorder.lr if s >= second.step):
        assert recorder.lr[step] == pytest.approx(min(0.5 * recorder.schedule[step], 0.5 * cap))


@pytest.mark.parametrize("case", ["constant_lr", "switched_off"])
def test_a_divergence_at_a_constant_lr_or_with_the_cap_off_halves_the_lr_as_before(case):
    scheduler = None if case == "constant_lr" else warmup_cosine
    g = guard(warmup_cap_factor=None) if case == "switched_off" else guard()
    # the blow-up 2 steps after the spike: not a bad batch after a calm stretch, which keeps the LR
    recorder, m = ScheduleRecorder(), module(scheduler=scheduler, blow_up=SPIKE + 3)
    make_trainer([g, recorder], max_steps=80).fit(m)
    (rollback,) = rollbacks(g)
    assert rollback.lr_factor == 0.5 and rollback.lr_cap is None and "capped" not in str(rollback)
    assert lr_caps(m.trainer.optimizers) == [[math.inf]] and not g.policy.capped
    for step in (s for s in recorder.lr if s >= rollback.step):
        assert recorder.lr[step] == pytest.approx(0.5 * recorder.schedule[step])


def test_a_resumed_run_keeps_the_cap_and_knows_it_was_set(tmp_path):
    straight_guard, straight = guard(), ScheduleRecorder()
    make_trainer([straight_guard, straight], max_steps=STEPS).fit(module(second_failure=True))

    first_guard = guard()
    trainer = make_trainer([first_guard, ScheduleRecorder()], max_steps=64)
    trainer.fit(module(second_failure=True))
    path = tmp_path / "step64.ckpt"
    trainer.save_checkpoint(path)  # after the cap (step 47), before the second failure (step 78)
    resumed_guard, resumed = guard(), ScheduleRecorder()
    make_trainer([resumed_guard, resumed], max_steps=STEPS).fit(module(second_failure=True), ckpt_path=path)

    assert resumed_guard.policy.capped
    # the cap is in the optimizer's state: the resumed LRs are the uninterrupted run's, and the second failure
    # cuts (a guard that forgot the cap was set would cap again, keeping the LR)
    for step, lr in resumed.lr.items():
        assert lr == pytest.approx(straight.lr[step]), step
    (second,) = rollbacks(resumed_guard)
    assert second.lr_factor == 0.5 and second.lr_cap is None


def test_a_dry_run_says_it_would_cap_and_changes_nothing():
    g, recorder = guard(dry_run=True), ScheduleRecorder()
    make_trainer([g, recorder], max_steps=80).fit(module())
    (rollback,) = rollbacks(g)
    assert rollback.dry_run and "would cap the peak at" in str(rollback)
    assert all(recorder.lr[s] == recorder.schedule[s] for s in recorder.lr)


def test_cuts_scale_the_cap_and_min_lr_stays_the_floor():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    set_min_lr(optimizer, 0.1)
    set_lr_caps([optimizer], [[0.4]])
    assert optimizer.param_groups[0]["lr"] == 0.4  # the cap holds the LR below the schedule's 1.0
    (change,) = cut_lr([optimizer], 0.5)  # a cut bites where the cap holds the LR
    assert change.new == pytest.approx(0.2) and lr_caps([optimizer]) == [[pytest.approx(0.2)]]
    cut_lr([optimizer], 0.25)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # min_lr is the floor, also under a cap
    set_lr_caps([optimizer], [[math.inf]])
    assert "lr_guard_cap" not in optimizer.param_groups[0]


def test_warmup_cap_factor_is_checked():
    with pytest.raises(ValueError, match=r"warmup_cap_factor must be in \(0.0, 1.0\), got 1.5"):
        LRGuard(warmup_cap_factor=1.5)


def test_a_slow_rise_that_began_in_the_warm_up_and_is_seen_after_it_is_capped_where_it_began():
    rise_from, steps = 60, 300
    values = [2.0 / (1.0 + 0.05 * t) for t in range(rise_from + 1)]
    values += [values[-1] * math.exp(0.005 * k) for k in range(1, steps - rise_from)]  # up 0.5% a step, from 60
    g, recorder = guard(), ScheduleRecorder()
    scripted = ScriptedLossModule(values, optimizer="adam", lr=LR, batch_size=256, scheduler=warmup_cosine)
    make_trainer([g, recorder], max_steps=steps).fit(scripted)
    first = rollbacks(g)[0]
    # seen after the warm-up (step 100) by the sustained-rise rule, which dates the rise to its lowest value
    assert "Mann-Kendall" in first.event.message and first.event.step > WARMUP
    assert first.event.began == rise_from and first.trouble_step == rise_from
    assert first.trouble_lr == recorder.lr[rise_from] < 0.7 * LR
    assert first.lr_cap == pytest.approx(g.warmup_cap_factor * recorder.lr[rise_from]) and first.lr_factor == 1.0


def warm_up_plateau_values(steps=300, best=40, level=0.80):
    """Falls to step ``best`` (in the warm-up), then sits higher (``level``) with a little noise: the higher LR
    lost ground and the loss does not come back while the LR keeps rising."""
    values = [2.0 / (1.0 + 0.05 * t) for t in range(best + 1)]
    return values + [level + 0.01 * math.sin(1.3 * t) for t in range(best + 1, steps)]


def test_a_plateau_that_lost_ground_while_the_warm_up_rose_rolls_back_before_its_best_and_caps_the_lr():
    g, recorder = guard(plateau=True), ScheduleRecorder()
    scripted = ScriptedLossModule(
        warm_up_plateau_values(), optimizer="adam", lr=LR, batch_size=256, scheduler=warmup_cosine
    )
    make_trainer([g, recorder], max_steps=300).fit(scripted)
    first = g.decisions[0]
    assert first.event.kind == "plateau" and first.action.value == "rollback"
    best = first.event.began  # the best level: where the falling values leave the window, before the LR peaks
    assert best is not None and best < WARMUP < first.event.step
    # back to a snapshot no later than the best level (kept past the good one's moves: the progress mark)
    assert first.rollback_to <= best and first.event.step - first.rollback_to > 2 * g.snapshot_every
    assert first.trouble_step == best and first.trouble_lr == recorder.lr[best]
    assert first.lr_cap == pytest.approx(g.warmup_cap_factor * recorder.lr[best]) and first.lr_factor == 1.0
    assert "before the best level" in str(first) and "progress stopped at LR" in str(first)
    assert g.policy.capped
    assert all(recorder.lr[s] <= first.lr_cap * (1 + 1e-9) for s in recorder.lr if s >= first.step)


def test_a_flat_loss_under_a_rising_lr_gets_no_cap():
    flat = [2.0 / (1.0 + 0.05 * t) for t in range(41)] + [2.0 / 3.0] * 260  # stopped, but lost nothing
    g = guard(plateau=True)
    make_trainer([g], max_steps=300).fit(
        ScriptedLossModule(flat, optimizer="adam", lr=LR, batch_size=256, scheduler=warmup_cosine)
    )
    assert g.decisions and all(d.lr_cap is None and d.action.value != "rollback" for d in g.decisions)
    assert not g.policy.capped


def test_a_warm_restart_is_no_warm_up_for_a_plateau():
    restarts = lambda o: S.CosineAnnealingWarmRestarts(o, T_0=60)  # noqa: E731 - the LR jumps up once at 60
    g = guard(plateau=True)
    make_trainer([g], max_steps=300).fit(
        ScriptedLossModule(warm_up_plateau_values(), optimizer="adam", lr=LR, batch_size=256, scheduler=restarts)
    )
    assert all(d.lr_cap is None for d in g.decisions) and not g.policy.capped
