"""The guard beside the rest of Lightning: loop settings, step outputs, data sets, the tuner, both namespaces and
spawned DDP. Each test is a real Trainer run with a fault the guard must rescue, or a tool it must leave alone."""

import math
import os
import warnings

import pytest
import pytorch_lightning as pl
import torch
from conftest import make_trainer
from test_ddp import run_ddp
from test_guard import _lightning_scripted, decaying
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lr_guard import Action, LRGuard
from lr_guard.testing import ScriptedLossModule, TinyRegressionModule, regression_data


def finite(module):
    return all(
        bool(torch.isfinite(t).all()) for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()
    )


def actions(guard):
    return [(d.event.step, d.action, d.rollback_to) for d in guard.decisions]


def same_state(a, b):
    """Two (nested) state dicts hold equal values, tensors compared exactly."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(same_state, a, b))
    return a == b


# ---------------------------------------------------------------------------------------- gradient accumulation
class NaNMicroBatch(ScriptedLossModule):
    """A NaN in the second of the four micro-batches of optimizer step 25 only."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step == 25 and batch_idx % 4 == 1:
            loss = loss * math.nan
        return loss


@pytest.mark.parametrize("gate", [False, True], ids=["rollback", "gate"])
def test_gradient_accumulation_with_a_nan_micro_batch(gate):
    module = NaNMicroBatch(decaying(), optimizer="adam", lr=0.01)
    guard = LRGuard(snapshot_every=10, confirm_steps=3, gate=gate)
    make_trainer([guard], max_steps=40, accumulate_grad_batches=4).fit(module)
    # one NaN micro-batch poisons the step's accumulated gradient: the gate skips that step's update, or the
    # guard rolls back to the last good snapshot
    assert actions(guard) == ([(25, Action.SKIP, None)] if gate else [(25, Action.ROLLBACK, 20)])
    assert finite(module)


# ------------------------------------------------------------------------------- GAN-style manual optimization
class TinyGAN(pl.LightningModule):
    """A generator and a discriminator, each with its own optimizer, stepped in turn (Lightning's GAN pattern)."""

    def __init__(self, nan_at_step):
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 8))
        self.discriminator = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.nan_at_step = nan_at_step

    def train_dataloader(self):
        return DataLoader(regression_data(), batch_size=16)

    def configure_optimizers(self):
        betas = (0.5, 0.999)
        return [
            torch.optim.Adam(self.generator.parameters(), lr=1e-3, betas=betas),
            torch.optim.Adam(self.discriminator.parameters(), lr=1e-3, betas=betas),
        ]

    def training_step(self, batch, batch_idx):
        real, _ = batch
        g_opt, d_opt = self.optimizers()
        bce = nn.functional.binary_cross_entropy_with_logits
        ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)

        self.toggle_optimizer(d_opt)
        fake = self.generator(torch.randn(len(real), 4)).detach()
        d_loss = bce(self.discriminator(real), ones) + bce(self.discriminator(fake), zeros)
        if self.global_step == self.nan_at_step:
            d_loss = d_loss * math.nan  # poisons the discriminator's gradients, weights and moments
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()
        self.untoggle_optimizer(d_opt)

        self.toggle_optimizer(g_opt)
        g_loss = bce(self.discriminator(self.generator(torch.randn(len(real), 4))), ones)
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()
        self.untoggle_optimizer(g_opt)
        self.log("d_loss", d_loss.detach())
        self.log("g_loss", g_loss.detach())


class StateRecorder(pl.Callback):
    """Every optimizer's state and the weights before each batch, and after the guard's first rollback (put this
    callback after the guard)."""

    def __init__(self, guard):
        self.guard, self.before, self.after_rollback = guard, {}, None

    def state(self, trainer, module):
        optimizers = [copy_state(opt.state_dict()) for opt in trainer.optimizers]
        for state in optimizers:  # the user's settings and the moments, not the guard's own bookkeeping keys
            state["param_groups"] = [
                {k: v for k, v in g.items() if not k.startswith("lr_guard_")} for g in state["param_groups"]
            ]
        return {"optimizers": optimizers, "weights": copy_state(module.state_dict())}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before.setdefault(trainer.global_step, self.state(trainer, module))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.after_rollback is None and any(d.action == Action.ROLLBACK for d in self.guard.decisions):
            self.after_rollback = self.state(trainer, module)


def copy_state(state):
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: copy_state(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(copy_state(v) for v in state)
    return state


def test_gan_style_manual_optimization_with_two_optimizers_rolls_back_both():
    module = TinyGAN(nan_at_step=50)  # two optimizer steps per batch: global_step moves by 2
    guard = LRGuard(gate=False, monitor="d_loss", check_on="train_step", snapshot_every=10, confirm_steps=3)
    recorder = StateRecorder(guard)
    make_trainer([guard, recorder], max_steps=100).fit(module)
    rollbacks = [d for d in guard.decisions if d.action == Action.ROLLBACK]
    assert [(d.event.step, d.rollback_to) for d in rollbacks] == [(50, 40)], [d.message for d in guard.decisions]
    # both optimizers' moments and step counts, and both networks' weights, are those of step 40
    assert recorder.after_rollback is not None
    assert same_state(recorder.after_rollback, recorder.before[40])
    assert finite(module)
    assert all(torch.isfinite(v).all() for opt in module.optimizers() for s in opt.state.values() for v in s.values())


# ---------------------------------------------------------------------------- training_step's other outputs
class DictOrNone(ScriptedLossModule):
    """Returns ``{"loss": ...}``, and ``None`` for every fifth batch (Lightning then skips its backward)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx % 5 == 3 else {"loss": loss}


@pytest.mark.parametrize("gate", [False, True], ids=["rollback", "gate"])
def test_training_step_returning_a_dict_or_none(gate):
    module = DictOrNone(decaying(nan_at=[36]), optimizer="adam", lr=0.01)
    guard = LRGuard(snapshot_every=10, confirm_steps=3, gate=gate)
    trainer = make_trainer([guard], max_steps=60)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module)
    # a None batch still takes an optimizer step, with no gradient: nothing to score, nothing to warn about
    assert trainer.global_step == 60
    ours = [str(w.message) for w in caught if f"{os.sep}lr_guard{os.sep}" in w.filename]
    assert [text for text in ours if "has no logger" not in text] == []
    assert actions(guard) == ([(36, Action.SKIP, None)] if gate else [(36, Action.ROLLBACK, 30)])
    assert finite(module)


# ------------------------------------------------------------------------------------------- IterableDataset
class Stream(IterableDataset):
    """The regression data as a stream of samples: no ``len``."""

    def __init__(self, passes):
        self.data, self.passes = regression_data(), passes

    def __iter__(self):
        for _ in range(self.passes):
            yield from zip(*self.data.tensors, strict=True)


class Streamed(ScriptedLossModule):
    def __init__(self, script, passes):
        super().__init__(script, optimizer="adam", lr=0.01)
        self.passes = passes

    def train_dataloader(self):
        return DataLoader(Stream(self.passes), batch_size=16)


@pytest.mark.parametrize(
    ("passes", "loop"), [(100, {"max_steps": 60}), (1, {"max_steps": -1, "max_epochs": 4})], ids=["steps", "epochs"]
)
def test_an_iterable_dataset_without_a_length(passes, loop):
    module = Streamed(decaying(nan_at=[35]), passes)
    guard = LRGuard(gate=False, snapshot_every=10, confirm_steps=3)
    trainer = make_trainer([guard], **loop)
    trainer.fit(module)
    assert trainer.num_training_batches == math.inf  # Lightning does not know the epoch's length
    assert actions(guard) == [(35, Action.ROLLBACK, 30)] and finite(module)
    assert trainer.global_step == 60 if "max_epochs" not in loop else trainer.current_epoch == 4
    patience = guard.detectors["plateau"].current_patience
    assert isinstance(patience, int) and 1 <= patience <= 1000


# ------------------------------------------------------------------------------------------- Tuner.lr_find
def test_lr_find_with_the_guard_attached_then_a_guarded_fit():
    from pytorch_lightning.tuner import Tuner

    module = TinyRegressionModule(lr=0.01, poison_steps=[35])
    guard = LRGuard(gate=False, snapshot_every=10, confirm_steps=3)
    trainer = make_trainer([guard], max_steps=60)
    start = {k: v.clone() for k, v in module.state_dict().items()}
    finder = Tuner(trainer).lr_find(module, min_lr=1e-4, max_lr=10.0, num_training=40, early_stop_threshold=None)
    losses = finder.results["loss"]
    assert len(losses) == 40 and not all(math.isfinite(v) and v < 10 * losses[0] for v in losses)  # it diverged
    assert finder.suggestion() is not None
    assert guard.decisions == [] and guard.counts["rollbacks"] == 0 and not trainer.should_stop
    assert all(torch.equal(v, start[k]) for k, v in module.state_dict().items())  # lr_find put the model back
    trainer.fit(module)
    assert trainer.global_step == 60
    assert actions(guard) == [(35, Action.ROLLBACK, 30)] and finite(module)


# ------------------------------------------------------------------------------------------- lightning.pytorch
@pytest.mark.parametrize(
    ("callback", "gate", "expected"),
    [
        ("LRGuard", False, (25, Action.ROLLBACK, 20)),
        ("LRGuard", True, (25, Action.SKIP, None)),
        ("DivergenceRollback", False, (25, Action.ROLLBACK, 20)),
    ],
    ids=["LRGuard", "LRGuard_gate", "DivergenceRollback"],
)
def test_lightning_pytorch_classes_rescue_a_nan(callback, gate, expected):
    import lightning.pytorch as L

    import lr_guard.lightning

    kwargs = {"gate": gate}
    guard = getattr(lr_guard.lightning, callback)(snapshot_every=10, confirm_steps=3, **kwargs)
    module = _lightning_scripted(decaying(nan_at=[25]))
    make_trainer([guard], max_steps=40, trainer_class=L.Trainer).fit(module)
    assert actions(guard) == [expected] and finite(module)


# ------------------------------------------------------------------------------------------------- ddp_spawn
@pytest.mark.slow
def test_ddp_spawn_with_a_nan_on_one_rank(tmp_path):
    """``strategy="ddp_spawn"`` (2 spawned gloo processes): the NaN of rank 1 rolls back both ranks at the same
    step, and their parameters stay identical."""
    r0, r1 = run_ddp("spawn_nan_on_rank1", tmp_path)
    assert r0["strategy"] == r1["strategy"] == "DDPStrategy" and r0["spawned"] and r1["spawned"]
    assert r0["decisions"] == r1["decisions"] == [[25, "rollback", 20]]
    assert r0["params_sha256"] == r1["params_sha256"] and r0["finite"] and r1["finite"]
