"""The update gate: a bad update is stopped before it lands, exactly, and every skip is recorded."""

import copy
import json
import math

import pytest
import pytorch_lightning as pl
import torch
from conftest import make_trainer
from torch import nn

from lr_guard import LRGuard
from lr_guard.actions.gate import UpdateGate
from lr_guard.skips import APPLIED, CLIPPED, GRAD_OUTLIER, LOSS_OUTLIER, NON_FINITE
from lr_guard.testing import ScriptedLossModule


def decaying(n=80):
    return [2.0 / (1.0 + 0.02 * t) for t in range(n)]


OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),  # outside torch's fused family
    "adam_fused": lambda p: torch.optim.Adam(p, lr=0.01, fused=True),
}


class BatchNormNet(pl.LightningModule):
    """A model with BatchNorm buffers whose loss at one step is poisoned (NaN, or its labels corrupted)."""

    def __init__(self, optimizer, poison_at, poison):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
        self.make_optimizer, self.poison_at, self.poison = optimizer, poison_at, poison
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(512, 8, generator=generator)
        self.y = self.x.sum(1, keepdim=True) + 0.1 * torch.randn(512, 1, generator=generator)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=32)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.global_step == self.poison_at:
            x = x * math.nan if self.poison == "nan" else x
            y = y * 1e3 if self.poison == "labels" else y
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


class StateAround(pl.Callback):
    """The full training state just before the batch of ``step`` and just after its update."""

    def __init__(self, step):
        self.step, self.before, self.after = step, None, None

    @staticmethod
    def state(trainer, module):
        return copy.deepcopy((module.state_dict(), trainer.optimizers[0].state_dict()))

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.before = self.state(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1:
            self.after = self.state(trainer, module)


def assert_equal_states(a, b):
    (model_a, opt_a), (model_b, opt_b) = a, b
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a), "weights or buffers moved"
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for i, entry in opt_a["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["state"][i][key])), (i, key)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("poison", ["nan", "labels"])
def test_a_skipped_step_leaves_weights_buffers_and_optimizer_state_exactly_as_they_were(name, poison):
    around = StateAround(step=40)
    guard = LRGuard(gate=True, verbose=False)
    module = BatchNormNet(OPTIMIZERS[name], poison_at=40, poison=poison)
    make_trainer([around, guard], max_steps=60).fit(module)
    assert_equal_states(around.before, around.after)
    skips = [d for d in guard.decisions if d.action.value == "skip"]
    assert [d.event.step for d in skips] == [40] and skips[0].event.detector == "gate"
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert guard.counts["rollbacks"] == 0 and guard.counts["skipped_batches"] == 1


def test_every_skip_is_recorded_with_its_batch_and_reason(tmp_path):
    values = decaying(120)
    values[60], values[90] = math.nan, values[89] * 6.5
    guard = LRGuard(gate=True, verbose=False, checkpoint_dir=str(tmp_path))
    make_trainer([guard], max_steps=len(values)).fit(ScriptedLossModule(values, optimizer="adam", lr=0.01))
    skips = [d for d in guard.decisions if d.action.value == "skip"]
    assert [(d.event.step, d.epoch, d.batch_idx) for d in skips] == [(60, 3, 12), (90, 5, 10)]  # 16 batches/epoch
    records = json.loads((tmp_path / "skipped_updates.json").read_text())
    assert [(r["step"], r["epoch"], r["batch_idx"]) for r in records] == [(60, 3, 12), (90, 5, 10)]
    assert "not finite" in records[0]["why"] and "loss is an outlier" in records[1]["why"]
    assert records[0]["loss"] == "nan" and records[1]["loss"] == pytest.approx(values[90], rel=1e-5)


def test_the_gradient_norm_is_logged_and_fed_to_detectors_of_its_signal(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lr_guard import SpikeDetector

    detector = SpikeDetector(name="grad_spike", signal="grad_norm", warmup_steps=10)
    guard = LRGuard(gate=UpdateGate(warmup_steps=1000), detectors=[detector], rollback=False, verbose=False)
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    module = BatchNormNet(OPTIMIZERS["adam"], poison_at=50, poison="labels")
    make_trainer([guard], max_steps=80, logger=logger, log_every_n_steps=1).fit(module)
    assert detector.n_updates == 80  # every step's gradient norm, measured by the gate
    assert (50, "grad_spike") in [(d.event.step, d.event.detector) for d in guard.decisions]
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    norms = acc.Scalars("lr_guard/grad_norm/raw")
    # every step's, from the second: the chart draws it beside its trend and alarm level, known from then on
    assert [e.step for e in norms] == list(range(1, 80)) and max(norms, key=lambda e: e.value).step == 50
    assert "lr_guard/grad_spike/score" in acc.Tags()["scalars"]


def test_clip_mode_scales_an_outlier_gradient_down_and_applies_it():
    def moved(guard_kwargs):
        around = StateAround(step=40)
        callbacks = [around] + ([LRGuard(**guard_kwargs)] if guard_kwargs is not None else [])
        module = BatchNormNet(OPTIMIZERS["sgd_momentum"], poison_at=40, poison="labels")
        make_trainer(callbacks, max_steps=42).fit(module)
        change = around.before[0]["net.0.weight"] - around.after[0]["net.0.weight"]
        return float(change.abs().max()), callbacks[-1]

    unguarded, _ = moved(None)
    clipped, guard = moved({"gate": UpdateGate(mode="clip", use_loss=False), "verbose": False})
    assert [(d.event.step, d.action.value) for d in guard.decisions if d.event.detector == "gate"] == [(40, "clip")]
    assert 0.0 < clipped < unguarded / 10  # applied, scaled down from the corrupted labels' huge update


def test_a_nan_micro_batch_skips_the_whole_accumulated_step():
    values = decaying(200)
    values[81] = math.nan  # the second micro-batch of optimizer step 40 (2 micro-batches a step)

    class Accumulating(ScriptedLossModule):
        def training_step(self, batch, batch_idx):
            self.script_index = batch_idx + 16 * self.current_epoch
            loss = super().training_step(batch, batch_idx)
            value = values[self.script_index]
            return loss * (value / loss.detach())

    guard = LRGuard(gate=True, verbose=False)
    module = Accumulating(values, optimizer="adam", lr=0.01)
    make_trainer([guard], max_steps=60, accumulate_grad_batches=2).fit(module)
    assert [(d.event.step, d.action.value) for d in guard.decisions] == [(40, "skip")]
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_bf16_mixed_on_cpu_skips_a_nan_step():
    guard = LRGuard(gate=True, verbose=False)
    module = BatchNormNet(OPTIMIZERS["adamw"], poison_at=30, poison="nan")
    make_trainer([guard], max_steps=50, precision="bf16-mixed").fit(module)
    assert [(d.event.step, d.action.value) for d in guard.decisions] == [(30, "skip")]
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_the_gate_state_is_saved_and_resumed(tmp_path):
    module = BatchNormNet(OPTIMIZERS["adam"], poison_at=10**9, poison="nan")
    guard = LRGuard(gate=True, verbose=False)
    trainer = make_trainer([guard], max_steps=30)
    trainer.fit(module)
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    saved = guard.state_dict()["gate"]
    resumed = LRGuard(gate=True, verbose=False)
    make_trainer([resumed], max_steps=31).fit(BatchNormNet(OPTIMIZERS["adam"], 10**9, "nan"), ckpt_path=path)
    assert resumed.gate._steps == saved["steps"] + 1


def test_the_gate_decides_by_its_settings():
    gate = UpdateGate(threshold=6.0, warmup_steps=5, max_consecutive=2)
    norms = [1.0 + 0.01 * (t % 3) for t in range(30)]
    codes = [gate.decide(2.0 - 0.01 * t, n) for t, n in enumerate(norms)]
    assert set(codes) == {APPLIED}
    assert gate.decide(math.nan, 1.0) == NON_FINITE and gate.decide(1.7, math.inf) == NON_FINITE
    assert gate.decide(20.0, 1.0) == LOSS_OUTLIER and gate.decide(1.7, 50.0) == GRAD_OUTLIER
    assert gate.decide(1.7, 50.0) == APPLIED  # a third outlier in a row goes through: not an isolated batch
    early = UpdateGate(warmup_steps=5)
    assert [early.decide(1.0, n) for n in (1.0, 1.0, 100.0)] == [APPLIED] * 3  # no outlier during the warm-up
    clip = UpdateGate(mode="clip", warmup_steps=5)
    for t in range(30):
        clip.decide(None, 1.0 + 0.01 * (t % 3))
    assert clip.decide(None, 50.0) == CLIPPED and 0.0 < clip.last_scale < 0.1


def test_gate_settings_are_checked():
    with pytest.raises(ValueError, match="mode must be one of 'skip', 'clip'; got 'zero'"):
        UpdateGate(mode="zero")
    with pytest.raises(ValueError, match="threshold must be > 0.0"):
        UpdateGate(threshold=0)
    with pytest.raises(
        TypeError, match=r"gate must be None \(on, the default\), True, False or an lr_guard UpdateGate"
    ):
        LRGuard(gate="on")


@pytest.mark.parametrize("name", ["adam_fused", "adamw_fused", "sgd_fused", "adam"])
@pytest.mark.parametrize("poison", ["nan", "labels"])
def test_the_device_path_skips_exactly_and_decides_as_the_host_path(name, poison):
    """``on_device=True`` keeps the gate's statistics in tensors and decides there (on CPU here, the same code a
    GPU runs): a fused optimizer skips its own step through ``found_inf``, any other reads the verdict."""
    optimizers = {
        **OPTIMIZERS,
        "adamw_fused": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, fused=True),
        "sgd_fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
    }
    runs = {}
    for on_device in (False, True):
        pl.seed_everything(0, verbose=False)  # the same initial weights and batches for both runs
        around = StateAround(step=40)
        # fuse=False: the plain Adam stays as it is and reads the verdict (the fallback); fused below
        guard = LRGuard(gate=UpdateGate(on_device=on_device, fuse=False), verbose=False)
        module = BatchNormNet(optimizers[name], poison_at=40, poison=poison)
        make_trainer([around, guard], max_steps=60).fit(module)
        assert_equal_states(around.before, around.after)
        runs[on_device] = ([(d.event.step, d.action.value) for d in guard.decisions], around.after)
        assert not hasattr(module.trainer.optimizers[0], "found_inf")  # taken back after each step
    assert runs[True][0] == runs[False][0] == [(40, "skip")]
    assert_equal_states(runs[True][1], runs[False][1])


class FoundInfSpy(pl.Callback):
    """Whether every optimizer step was handed a ``found_inf`` (the device path: nothing read on the host)."""

    def __init__(self):
        self.handed = []

    def on_train_start(self, trainer, module):
        optimizer = trainer.optimizers[0]
        step = optimizer.step

        def spied(closure):  # the closure runs backward and the hooks; the step then reads ``found_inf``
            def closure_then_look():
                loss = closure()
                self.handed.append(getattr(optimizer, "found_inf", None) is not None)
                return loss

            return step(closure_then_look)

        optimizer.step = spied


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd_momentum"])
def test_the_device_path_switches_a_default_adam_adamw_or_sgd_to_fused_and_skips_on_the_device(name):
    """torch's Adam, AdamW and SGD at their default implementation are switched to fused=True by the device path,
    so every step is handed the gate's verdict as ``found_inf`` (no host read), and a NaN step leaves the weights,
    buffers and optimizer state bit-identical. ``fuse=False`` leaves the optimizer as it was."""
    pl.seed_everything(0, verbose=False)
    around, spy = StateAround(step=40), FoundInfSpy()
    guard = LRGuard(gate=UpdateGate(on_device=True), verbose=False)
    module = BatchNormNet(OPTIMIZERS[name], poison_at=40, poison="nan")
    make_trainer([around, spy, guard], max_steps=60).fit(module)
    optimizer = module.trainer.optimizers[0]
    assert all(group["fused"] for group in optimizer.param_groups)
    assert spy.handed and all(spy.handed)
    assert_equal_states(around.before, around.after)
    assert [(d.event.step, d.action.value) for d in guard.decisions] == [(40, "skip")]

    kept = BatchNormNet(OPTIMIZERS[name], poison_at=40, poison="nan")
    spy = FoundInfSpy()
    make_trainer([spy, LRGuard(gate=UpdateGate(on_device=True, fuse=False), verbose=False)], max_steps=20).fit(kept)
    assert not any(g.get("fused") for g in kept.trainer.optimizers[0].param_groups) and not any(spy.handed)


def test_the_device_path_keeps_its_state_across_a_resume(tmp_path):
    guard = LRGuard(gate=UpdateGate(on_device=True), verbose=False)
    trainer = make_trainer([guard], max_steps=30)
    trainer.fit(BatchNormNet(OPTIMIZERS["adam_fused"], poison_at=10**9, poison="nan"))
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    saved = guard.state_dict()["gate"]["device"]
    resumed = LRGuard(gate=UpdateGate(on_device=True), verbose=False)
    make_trainer([resumed], max_steps=31).fit(
        BatchNormNet(OPTIMIZERS["adam_fused"], 10**9, "nan"), ckpt_path=tmp_path / "mid.ckpt"
    )
    assert torch.equal(resumed.gate._device_state["n"], saved["n"] + 1)  # one more step taken in, after the 30


@pytest.mark.parametrize("averaging", ["ema", "swa"])
def test_weight_averaging_beside_the_gate_never_takes_in_non_finite_weights(averaging):
    """A NaN batch skipped by the gate never reaches the weights, so an average of them (EMA, SWA) stays finite,
    and so does the model Lightning copies the average into at the end."""
    from pytorch_lightning.callbacks import EMAWeightAveraging, StochasticWeightAveraging

    average = EMAWeightAveraging() if averaging == "ema" else StochasticWeightAveraging(swa_lrs=1e-3, swa_epoch_start=1)
    values = decaying(120)
    values[45] = math.nan
    guard = LRGuard(gate=True, verbose=False)
    module = ScriptedLossModule(values, optimizer="adam", lr=0.01)
    make_trainer([guard, average], max_steps=len(values)).fit(module)
    assert [(d.event.step, d.action.value) for d in guard.decisions] == [(45, "skip")]
    assert all(torch.isfinite(p).all() for p in module.parameters())


def _first_rollback(with_grad_norm, loss_at=None, norm_at=None, steps=120):
    """The policy over a run whose gradient norm blows up at step 60 and whose loss follows a step later, rising
    to 3x and more (or ``loss_at(t)``, ``norm_at(t)``): with the gradient norm watched, and without."""
    from lr_guard import DivergenceDetector, SpikeDetector
    from lr_guard.config import GuardConfig
    from lr_guard.policy import GuardPolicy

    detectors = {"spike": SpikeDetector(), "divergence": DivergenceDetector()}
    if with_grad_norm:
        detectors["grad_norm_divergence"] = DivergenceDetector(
            name="grad_norm_divergence", signal="grad_norm", far_at_once=True
        )  # as the guard's: a gradient norm far above the untrained one warns at once, and the loss confirms it
    loss_at = loss_at or (lambda t: 3.0 * 1.3 ** (t - 61) if t >= 61 else 1.0)
    norm_at = norm_at or (lambda t: 1.0 + 0.02 * (t % 4) if t < 60 else 200.0)
    policy = GuardPolicy(detectors, GuardConfig(snapshot_every=10, confirm_steps=3))
    policy.start(0)
    for t in range(steps):
        loss = (2.0 - 0.005 * t) * (1.0 + 0.01 * (t % 3)) * loss_at(t)
        for intent in policy.observe(t, {"loss": loss, "grad_norm": norm_at(t)}):
            if intent.action.value == "rollback":
                return t, intent
        if policy.wants_snapshot(t + 1):
            policy.snapshot_taken(t + 1)
    return None, None


def test_a_gradient_norm_blow_up_the_loss_confirms_is_rolled_back_earlier():
    early, intent = _first_rollback(with_grad_norm=True)
    late, _ = _first_rollback(with_grad_norm=False)
    assert early == 61 and "the loss confirms the gradient-norm divergence of step 60" in intent.reason
    assert late is not None and late > early


def test_a_one_value_loss_blow_up_whose_gradient_norm_blew_up_too_is_rolled_back():
    # One batch at step 60 the gate let through: loss 30x and gradient norm 1000x, then the losses look normal.
    # The loss alone is a bad batch (it came back); with its huge gradient applied the model is hit: rolled back.
    def first_rollback(norm_at_60):
        return _first_rollback(
            True,
            loss_at=lambda t: 30.0 if t == 60 else 1.0,
            norm_at=lambda t: norm_at_60 if t == 60 else 1.0 + 0.02 * (t % 4),
            steps=80,
        )

    step, intent = first_rollback(norm_at_60=1000.0)
    assert step == 60 and intent.event.began == 60 and "confirms the loss's blow-up" in intent.reason
    assert first_rollback(norm_at_60=1.0) == (None, None)  # the loss alone came back: a bad batch


def test_a_gradient_norm_warning_alone_is_only_logged():
    from lr_guard import DivergenceDetector
    from lr_guard.config import GuardConfig
    from lr_guard.policy import GuardPolicy

    policy = GuardPolicy(
        {"grad_norm_divergence": DivergenceDetector(name="grad_norm_divergence", signal="grad_norm")},
        GuardConfig(),
    )
    policy.start(0)
    intents = [i for t in range(80) for i in policy.observe(t, {"loss": 1.0, "grad_norm": 200.0 if t >= 40 else 1.0})]
    assert intents and all(i.action.value == "none" and "a warning" in i.reason for i in intents)


def test_the_gate_watches_the_gradient_norm_for_divergence():
    guard = LRGuard(gate=True)
    assert guard.detectors["grad_norm_divergence"].signal == "grad_norm"
    assert "grad_norm_divergence" not in LRGuard(gate=True, divergence=False).detectors


def test_a_lasting_run_of_nan_steps_is_rolled_back_and_stops_with_a_checkpoint(tmp_path):
    """The gate skips every NaN update, so no NaN lands; but NaNs to the end are not one bad batch. Each 16
    non-finite steps in a row count as a divergence: rolled back within the budget, then the guard stops with its
    last good state saved, as without the gate. Fewer in a row (recurring bad samples) are only skipped."""
    from lr_guard.events import Action
    from lr_guard.policy import LASTING_NON_FINITE

    script = decaying(40) + [math.nan] * 400
    guard = LRGuard(snapshot_every=10, confirm_steps=3, max_rollbacks=2, checkpoint_dir=str(tmp_path), verbose=False)
    module = ScriptedLossModule(script, optimizer="adam", lr=0.01)
    make_trainer([guard], max_steps=300).fit(module)
    acted = [(d.event.step, d.action) for d in guard.decisions if d.action != Action.SKIP]
    assert [a for _, a in acted] == [Action.ROLLBACK, Action.ROLLBACK, Action.STOP]
    assert acted[0][0] == 40 + LASTING_NON_FINITE - 1  # the 16th NaN step in a row
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert list(tmp_path.glob("last_good_step*.ckpt"))  # the stop wrote the last good state

    short = decaying(80)
    for start in (40, 60):
        short[start : start + LASTING_NON_FINITE - 1] = [math.nan] * (LASTING_NON_FINITE - 1)
    guard = LRGuard(snapshot_every=10, confirm_steps=3, verbose=False)
    make_trainer([guard], max_steps=80).fit(ScriptedLossModule(short, optimizer="adam", lr=0.01))
    assert {d.action for d in guard.decisions} == {Action.SKIP} and guard.counts["rollbacks"] == 0


def test_a_run_of_nan_steps_cut_by_a_checkpoint_and_resume_is_counted_whole(tmp_path):
    """The count of non-finite steps in a row is in the guard's checkpoint state: a run saved ten NaN steps into
    a streak and resumed rolls back at the streak's 16th step, as the run that went on does."""
    from lr_guard.events import Action
    from lr_guard.policy import LASTING_NON_FINITE

    script = decaying(40) + [math.nan] * 200

    def rollback_steps(guard):
        return [d.event.step for d in guard.decisions if d.action == Action.ROLLBACK]

    pl.seed_everything(0, verbose=False)
    straight = LRGuard(snapshot_every=10, confirm_steps=3, verbose=False)
    make_trainer([straight], max_steps=70).fit(ScriptedLossModule(script, optimizer="adam", lr=0.01))

    pl.seed_everything(0, verbose=False)
    first = LRGuard(snapshot_every=10, confirm_steps=3, verbose=False)
    trainer = make_trainer([first], max_steps=50)
    trainer.fit(ScriptedLossModule(script, optimizer="adam", lr=0.01))
    assert not rollback_steps(first)  # ten NaN steps in, no rollback yet
    trainer.save_checkpoint(tmp_path / "mid_streak.ckpt")
    again = LRGuard(snapshot_every=10, confirm_steps=3, verbose=False)
    make_trainer([again], max_steps=70).fit(
        ScriptedLossModule(script, optimizer="adam", lr=0.01), ckpt_path=tmp_path / "mid_streak.ckpt"
    )
    assert rollback_steps(straight)[0] == 40 + LASTING_NON_FINITE - 1
    assert rollback_steps(again)[:1] == rollback_steps(straight)[:1]


def test_without_a_sync_fallback_the_device_path_stands_aside_for_an_optimizer_that_cannot_skip_on_the_device():
    """``LRGuard()``'s own gate (``sync_fallback=False``) never reads a verdict on the host: for an optimizer
    outside torch's fused family (Adagrad) the device path stands aside, no step is gated, and a NaN is left to
    the rollback path. With ``sync_fallback=True`` the verdict is read and the NaN step skipped."""
    from lr_guard.events import Action

    assert LRGuard().gate.sync_fallback is False and LRGuard(gate=True).gate.sync_fallback is True
    decisions = {}
    for fallback in (False, True):
        pl.seed_everything(0, verbose=False)
        guard = LRGuard(gate=UpdateGate(on_device=True, sync_fallback=fallback), snapshot_every=10, verbose=False)
        module = BatchNormNet(OPTIMIZERS["adagrad"], poison_at=40, poison="nan")
        make_trainer([guard], max_steps=60).fit(module)
        decisions[fallback] = [(d.event.step, d.action) for d in guard.decisions]
        assert all(torch.isfinite(p).all() for p in module.parameters())
    assert decisions[True] == [(40, Action.SKIP)]
    assert [a for _, a in decisions[False]] == [Action.ROLLBACK]  # the NaN landed and was rolled back
