"""Mixed precision: bf16 on CPU; fp16 with a real GradScaler (torch's CPU scaler; the CUDA test skips without a GPU)."""

import copy
import math

import pytest
import pytorch_lightning as pl
import torch
from conftest import make_trainer
from pytorch_lightning.plugins.precision import MixedPrecision

from lr_guard import Action, LRGuard
from lr_guard.actions import take_snapshot
from lr_guard.actions.disk_snapshot import take_disk_snapshot
from lr_guard.testing import ScriptedLossModule


def script(n=200, nan_at=(), scale=1.0):
    s = [scale * 2.0 / (1.0 + 0.05 * t) for t in range(n)]
    for t in nan_at:
        s[t] = math.nan
    return s


class ScalerRecorder(pl.Callback):
    def __init__(self, guard):
        self.guard, self.at, self.after = guard, {}, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.at.setdefault(trainer.global_step, copy.deepcopy(trainer.precision_plugin.state_dict()))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if len([d for d in self.guard.decisions if d.action == Action.ROLLBACK]) > len(self.after):
            self.after.append(copy.deepcopy(trainer.precision_plugin.state_dict()))


def test_bf16_mixed_on_cpu_rolls_back_a_nan():
    guard = LRGuard(gate=False, snapshot_every=10, confirm_steps=3)
    module = ScriptedLossModule(script(nan_at=[35]), optimizer="adam", lr=0.01)
    make_trainer([guard], max_steps=60, precision="bf16-mixed").fit(module)
    assert [(d.action, d.rollback_to) for d in guard.decisions] == [(Action.ROLLBACK, 30)]
    assert all(torch.isfinite(p).all() for p in module.parameters())


def fp16_plugin(device="cpu", init_scale=2.0**24):
    return MixedPrecision("16-mixed", device, torch.amp.GradScaler(device, init_scale=init_scale, growth_interval=5))


def test_fp16_overflow_skips_are_not_divergence_and_the_scaler_is_in_the_snapshot():
    # A huge initial scale makes the first steps overflow in fp16: the scaler skips them and halves its scale.
    # The loss stays finite, so the guard sees nothing wrong; a real NaN later is rolled back with the scaler.
    guard = LRGuard(gate=False, snapshot_every=10, confirm_steps=3)
    recorder = ScalerRecorder(guard)
    module = ScriptedLossModule(script(nan_at=[45], scale=100.0), optimizer="adam", lr=0.01)
    trainer = make_trainer([guard, recorder], max_steps=60, plugins=[fp16_plugin()])
    trainer.fit(module)
    assert recorder.at[0]["scale"] > recorder.at[10]["scale"]  # overflow steps happened and were skipped
    assert [(d.action, d.event.step, d.rollback_to) for d in guard.decisions] == [(Action.ROLLBACK, 45, 40)]
    assert recorder.after[0] == recorder.at[40]  # the scaler's scale and growth tracker came back too
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_snapshots_copy_the_scalers_tensors_without_reading_them_on_the_host():
    # GradScaler.state_dict() reads the scale and growth tracker with .item(): two host syncs per snapshot on a GPU
    plugin = fp16_plugin()
    reads = []
    state_dict = plugin.scaler.state_dict
    plugin.scaler.state_dict = lambda: reads.append(1) or state_dict()
    guard = LRGuard(gate=False, snapshot_every=10, confirm_steps=3)
    module = ScriptedLossModule(script(nan_at=[45], scale=100.0), optimizer="adam", lr=0.01)
    make_trainer([guard], max_steps=60, plugins=[plugin]).fit(module)
    assert guard.counts["rollbacks"] == 1 and guard.counts["snapshots"] >= 5
    # only the snapshot at the start reads it: the scaler has no tensors yet and returns its initial numbers
    assert len(reads) == 1


def test_a_scalers_tensors_restore_into_a_scaler_that_has_none_yet(tmp_path):
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plugin = fp16_plugin(init_scale=2.0**10)
    plugin.scaler.scale(model(torch.ones(2, 3)).sum()).backward()
    plugin.scaler.step(optimizer)
    plugin.scaler.update()
    plugin.scaler.update(new_scale=123.0)
    snapshot = take_snapshot(1, model, [optimizer], [], precision=plugin)
    fresh = fp16_plugin(init_scale=2.0**10)  # never stepped: no scale tensor
    snapshot.restore(model, [optimizer], [], precision=fresh)
    assert fresh.scaler.state_dict() == plugin.scaler.state_dict() and fresh.scaler.get_scale() == 123.0
    plugin.scaler.update(new_scale=7.0)
    snapshot.restore(model, [optimizer], [], precision=plugin)  # and into the scaler's own tensors
    assert plugin.scaler.get_scale() == 123.0
    on_disk = take_disk_snapshot(1, model, [optimizer], [], str(tmp_path), "slot0", precision=plugin)
    plugin.scaler.update(new_scale=7.0)
    on_disk.restore(model, [optimizer], [], precision=plugin)  # disk snapshots keep the scaler the same way
    assert plugin.scaler.get_scale() == 123.0


def test_skipped_batches_work_under_a_grad_scaler():
    guard = LRGuard(gate=False, snapshot_every=10, confirm_steps=3, skip_batches=3)
    module = ScriptedLossModule(script(nan_at=[25]), optimizer="adam", lr=0.01)
    make_trainer([guard], max_steps=40, plugins=[fp16_plugin(init_scale=2.0**8)]).fit(module)
    assert guard.counts["skipped_batches"] == 3 and guard.counts["rollbacks"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_on_cuda_rolls_back_and_restores_the_scaler():
    guard = LRGuard(snapshot_every=10, confirm_steps=3)
    recorder = ScalerRecorder(guard)
    module = ScriptedLossModule(script(nan_at=[45], scale=100.0), optimizer="adam", lr=0.01)
    pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision="16-mixed",
        max_steps=60,
        callbacks=[guard, recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    ).fit(module)
    assert [(d.action, d.event.step) for d in guard.decisions] == [(Action.ROLLBACK, 45)]
    assert recorder.after[0] == recorder.at[guard.decisions[0].rollback_to]
