"""The GPU path: the guard's per-step hooks never make the host wait for the device (skipped without CUDA)."""

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from lr_guard import LRGuard
from lr_guard.testing import ScriptedLossModule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HOOKS = ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step", "on_train_batch_end")


class SyncFreeGuard(LRGuard):
    """LRGuard whose per-step hooks run under ``torch.cuda.set_sync_debug_mode("error")``: any host
    synchronisation inside them (``.item()``, a blocking copy, a stream or event wait) raises."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0
        for name in HOOKS:
            setattr(self, name, self._strict(getattr(self, name)))

    def _strict(self, hook):
        def run(*args, **kwargs):
            self.calls += 1
            torch.cuda.set_sync_debug_mode("error")
            try:
                return hook(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        return run


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])  # 16-mixed: a GradScaler is in every snapshot
def test_the_hooks_never_synchronise_the_host(tmp_path, precision):
    # defaults: all four detectors, a snapshot every 50 steps (the module has BatchNorm buffers), checks every 8
    # steps, diagnostics to TensorBoard; 160 steps include three snapshots taken after the first
    guard = SyncFreeGuard()
    script = [2.0 / (1 + 0.02 * t) for t in range(160)]
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision=precision,
        max_steps=160,
        callbacks=[guard],
        logger=TensorBoardLogger(tmp_path),
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(ScriptedLossModule(script, optimizer="adamw", lr=1e-3))
    assert guard.calls == 4 * 160
    assert guard.detectors["spike"].n_updates == 160  # every value reached the host and the detectors
    assert guard.counts["snapshots"] >= 3 and guard.decisions == []


def test_the_gate_skips_on_the_gpu_without_a_host_sync(tmp_path):
    """The update gate on a CUDA device with a fused AdamW decides beside the gradients and skips through the
    optimizer's ``found_inf``: a NaN step is skipped with no host sync in any hook."""
    from lr_guard import UpdateGate

    class FusedScripted(ScriptedLossModule):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)

    script = [2.0 / (1 + 0.02 * t) for t in range(120)]
    script[70] = float("nan")
    guard = SyncFreeGuard(gate=UpdateGate())
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        max_steps=120,
        callbacks=[guard],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    module = FusedScripted(script, optimizer="adamw", lr=1e-3)
    trainer.fit(module)
    assert [(d.event.step, d.action.value) for d in guard.decisions] == [(70, "skip")]
    assert all(torch.isfinite(p).all() for p in module.parameters())
