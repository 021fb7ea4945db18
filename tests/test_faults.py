"""The fault matrix: each row a real Trainer run with one kind of fault, with and without the guard."""

import copy
import math
import os

import pytest
import pytorch_lightning as pl
import torch
from conftest import make_trainer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.optim import lr_scheduler as S

from lr_guard import Action, LRGuard
from lr_guard.testing import ScriptedLossModule, TinyRegressionModule


def script(n=200, at=None):
    s = [2.0 / (1.0 + 0.05 * t) for t in range(n)]
    for t, v in (at or {}).items():
        s[t] = v
    return s


def finite(module):
    return all(torch.isfinite(p).all() for p in module.parameters()) and all(
        torch.isfinite(b).all() for b in module.buffers() if b.is_floating_point()
    )


def guarded(module, max_steps=60, **guard_kwargs):
    guard = LRGuard(**{"gate": False, "snapshot_every": 10, "confirm_steps": 3, **guard_kwargs})
    make_trainer([guard], max_steps=max_steps).fit(module)
    return guard


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan_loss", "inf_loss"])
def test_non_finite_loss(bad):
    module = ScriptedLossModule(script(at={35: bad}), optimizer="adam")
    guard = guarded(module)
    assert [(d.action, d.rollback_to) for d in guard.decisions] == [(Action.ROLLBACK, 30)]
    assert finite(module)


class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, math.nan)


class NaNGradientModule(ScriptedLossModule):
    """A finite loss whose gradients are NaN at one step (as a bad kernel or a 0/0 in backward gives)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return _NaNGrad.apply(loss) if self.global_step == 35 else loss


def test_finite_loss_with_nan_gradients():
    unguarded = NaNGradientModule(script(), optimizer="adam")
    make_trainer(max_steps=60).fit(unguarded)
    assert not finite(unguarded)
    module = NaNGradientModule(script(), optimizer="adam")
    guard = guarded(module)
    # the NaN weights show as a NaN loss one step later, and the rollback goes to before the bad update
    assert [(d.event.step, d.action, d.rollback_to) for d in guard.decisions] == [(36, Action.ROLLBACK, 30)]
    assert finite(module)


class HugeInputs(TinyRegressionModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.global_step == 150:
            batch = (x * 1e4, y)  # one poisoned batch
        return super().training_step(batch, batch_idx)


def test_one_poisoned_batch_with_huge_inputs():
    unguarded = HugeInputs(lr=0.05, seed=5)
    make_trainer(max_steps=300).fit(unguarded)
    module = HugeInputs(lr=0.05, seed=5)
    guard = guarded(module, max_steps=300)
    assert guard.counts["rollbacks"] >= 1 and finite(module)
    assert module.full_loss() < unguarded.full_loss() or not math.isfinite(unguarded.full_loss())
    assert module.full_loss() < 0.1


def test_a_run_that_diverges_every_time_stops_cleanly_with_a_loadable_checkpoint(tmp_path):
    module = ScriptedLossModule(script(n=40) + [math.nan] * 100, optimizer="adam")
    guard = guarded(module, max_steps=140, max_rollbacks=3, checkpoint_dir=str(tmp_path))
    assert [d.action for d in guard.decisions] == [Action.ROLLBACK] * 3 + [Action.STOP]
    stop = guard.decisions[-1]
    assert "still diverging after 3 rollback(s); training stopped" in stop.message and str(tmp_path) in stop.message
    resumed = ScriptedLossModule(script(), optimizer="adam")
    trainer = make_trainer([LRGuard(gate=False)], max_steps=60)
    trainer.fit(resumed, ckpt_path=stop.checkpoint)
    assert finite(resumed) and trainer.global_step == 60


class Raises(ScriptedLossModule):
    def training_step(self, batch, batch_idx):
        if self.global_step == 20:
            raise ZeroDivisionError("user bug at step 20")
        return super().training_step(batch, batch_idx)


def test_an_exception_in_training_step_propagates_unchanged_and_state_is_not_corrupted():
    guard = LRGuard(snapshot_every=10)
    module = Raises(script(), optimizer="adam", scheduler=lambda o: S.StepLR(o, 5, 0.5))
    trainer = make_trainer([guard], max_steps=60)
    with pytest.raises(ZeroDivisionError, match="user bug at step 20"):
        trainer.fit(module)
    assert finite(module) and guard.decisions == []
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert type(scheduler) is S.StepLR  # released by on_exception: the user's objects are as they were


class Interrupted(ScriptedLossModule):
    def training_step(self, batch, batch_idx):
        if self.global_step == 20:
            raise KeyboardInterrupt
        return super().training_step(batch, batch_idx)


def test_keyboard_interrupt_is_handled_by_lightning_and_leaves_a_clean_state():
    guard = LRGuard(snapshot_every=10)
    module = Interrupted(script(), optimizer="adam", scheduler=lambda o: S.StepLR(o, 5, 0.5))
    trainer = make_trainer([guard], max_steps=60)
    with pytest.raises(SystemExit):  # Lightning 2.x shuts down gracefully and exits with status 1
        trainer.fit(module)
    assert trainer.interrupted and finite(module)
    assert type(trainer.lr_scheduler_configs[0].scheduler) is S.StepLR


class TwoOptimizersNaN(ScriptedLossModule):
    def __init__(self):
        super().__init__(script(at={34: math.nan}), param_groups=2)  # global_step moves by 2 per batch
        self.automatic_optimization = False

    def configure_optimizers(self):
        a = torch.optim.Adam(
            [{"params": self.net[0].parameters(), "lr": 0.01}, {"params": self.net[1].parameters(), "lr": 0.001}]
        )
        b = torch.optim.SGD(self.net[3].parameters(), lr=0.05, momentum=0.9)
        return [a, b]

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()


def test_several_param_groups_and_a_second_optimizer():
    module = TwoOptimizersNaN()
    guard = LRGuard(
        gate=False,
        monitor="train_loss",
        check_on="train_step",
        snapshot_every=10,
        confirm_steps=3,
        keep_lr_on_bad_batch=False,
    )
    trainer = make_trainer([guard], max_steps=80)
    trainer.fit(module)
    assert [d.action for d in guard.decisions] == [Action.ROLLBACK] and finite(module)
    lrs = [[g["lr"] for g in opt.param_groups] for opt in trainer.optimizers]
    assert lrs == [[pytest.approx(0.005), pytest.approx(0.0005)], [pytest.approx(0.025)]]


def test_gradient_accumulation():
    module = ScriptedLossModule(script(at={25: math.nan}), optimizer="adam")
    guard = LRGuard(gate=False, snapshot_every=10, confirm_steps=3)
    make_trainer([guard], max_steps=40, accumulate_grad_batches=3).fit(module)
    assert [(d.event.step, d.rollback_to) for d in guard.decisions] == [(25, 20)] and finite(module)


class BufferRecorder(pl.Callback):
    def __init__(self):
        self.at = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.at.setdefault(trainer.global_step, copy.deepcopy(dict(module.named_buffers())))


def test_batchnorm_buffers_are_restored_with_the_rollback():
    module = ScriptedLossModule(script(at={35: math.nan}), optimizer="adam")
    recorder = BufferRecorder()
    guard = LRGuard(gate=False, snapshot_every=10, confirm_steps=3)
    make_trainer([guard, recorder], max_steps=36).fit(module)  # stop right after the rollback
    restored = dict(module.named_buffers())
    assert set(restored) == {"net.1.running_mean", "net.1.running_var", "net.1.num_batches_tracked"}
    for name, buf in recorder.at[30].items():
        assert torch.equal(restored[name], buf), name


finite_or_not = st.floats(min_value=-1e6, max_value=1e6) | st.sampled_from([math.nan, math.inf, -math.inf, 0.0])


@settings(
    max_examples=int(os.environ.get("LR_GUARD_FUZZ_EXAMPLES", "12")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(losses=st.lists(finite_or_not, min_size=1, max_size=40))
def test_arbitrary_loss_sequences_never_crash_and_end_with_finite_weights(losses):
    module = ScriptedLossModule(losses, optimizer="sgd", lr=0.01)
    guard = LRGuard(snapshot_every=5, confirm_steps=2, max_rollbacks=2)
    make_trainer([guard], max_steps=40).fit(module)
    assert finite(module), [d.message for d in guard.decisions]


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("FSDPStrategy", r"its state_dict\(\) gathers the full model on every rank.*Use ModelParallelStrategy"),
        ("DeepSpeedStrategy", r"DeepSpeed's engine owns the optimizer step.*Use ModelParallelStrategy"),
    ],
)
def test_fsdp1_and_deepspeed_are_refused_with_a_clear_error(name, why):
    strategy = type(name, (), {})()  # stands in for Lightning's: the guard looks at the strategy's class name only
    trainer = type("Trainer", (), {"strategy": strategy})()
    with pytest.raises(ValueError, match=f"does not support the {name} strategy: {why}"):
        LRGuard().setup(trainer, ScriptedLossModule(script()), "fit")


@pytest.mark.parametrize("max_rollbacks", [1, 3])
def test_nan_losses_that_outlast_the_skipped_batches_still_stop_the_run(max_rollbacks):
    """With the gate off and ``skip_batches``, a NaN in a skipped batch is only skipped; a NaN after the skips must
    still be a divergence. Before, the divergence detector stayed latched from the skipped NaN: NaN updates landed
    from then on, unseen, and the run ended with NaN weights and no stop."""
    script = [2.0 * 0.97**t for t in range(40)] + [math.nan] * 300
    guard = LRGuard(
        gate=False, snapshot_every=10, confirm_steps=3, skip_batches=7, max_rollbacks=max_rollbacks, verbose=False
    )
    module = ScriptedLossModule(script, optimizer="adam", lr=0.01)
    make_trainer([guard], max_steps=200).fit(module)
    actions = [d.action for d in guard.decisions]
    assert actions[0] == Action.ROLLBACK and Action.SKIP in actions and actions[-1] == Action.STOP
    assert all(torch.isfinite(p).all() for p in module.parameters())
