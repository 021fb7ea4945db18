"""A real multi-process DDP run (gloo on CPU) for tests/test_ddp.py; Lightning's ddp launcher re-runs this script
once per rank. Each rank writes what it saw and did to OUT/rank{r}.json.

    python tests/ddp_worker.py SCENARIO OUT_DIR
"""

import hashlib
import json
import math
import os
import sys
import warnings

import pytorch_lightning as pl
import torch

from lr_guard import LRGuard
from lr_guard.testing import ScriptedLossModule


class RankScripted(ScriptedLossModule):
    """The scripted loss, with faults seen by one rank only."""

    def __init__(self, faults, scheduler=None):
        super().__init__([2.0 / (1.0 + 0.05 * t) for t in range(400)], optimizer="adam", lr=0.01, scheduler=scheduler)
        self.faults = faults  # {rank: {step: value}}

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        fault = self.faults.get(self.global_rank, {})
        value = fault.get(
            self.global_step, fault.get("from") if self.global_step >= fault.get("start", 10**9) else None
        )
        if value is not None:
            loss = loss * (value / loss.detach())
        return loss


SCENARIOS = {
    "nan_on_rank1": {1: {25: math.nan}},
    "spike_on_rank0": {0: {30: 5000.0, 31: 5000.0, 32: 5000.0}},  # it stays up: a blow-up, not one bad batch
    "always_nan_on_rank0": {0: {"start": 25, "from": math.nan}},
    "gate_nan_on_rank1": {1: {25: math.nan}},
    "spawn_nan_on_rank1": {1: {25: math.nan}},
    "warmup_nan_on_rank1": {1: {25: math.nan}},
    "sweep_blows_up_on_rank1": {1: {12: 1e4}},  # in the LR sweep's 12th step, on one rank only
}
SEARCHED = {"sweep_blows_up_on_rank1": {"lr_search": True, "lr_search_sweep_steps": 20}}  # the guard's settings
WARMED_UP = {"warmup_nan_on_rank1"}  # scenarios with a linear warm-up over the whole run
GATED = {"gate_nan_on_rank1"}  # scenarios run with the update gate
SPAWNED = {"spawn_nan_on_rank1"}  # scenarios run with strategy="ddp_spawn" (the others re-run this script per rank)


class WriteResult(pl.Callback):
    """Each rank writes what it saw and did at the end of fit, in its own process (under ddp_spawn, the code
    after ``trainer.fit`` runs in the launching process only)."""

    def __init__(self, guard, out):
        self.guard, self.out = guard, out

    def teardown(self, trainer, pl_module, stage):
        guard = self.guard
        params = list(pl_module.parameters())
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in params)).hexdigest()
        result = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "spawned": type(trainer.strategy.launcher).__name__ == "_MultiProcessingLauncher",
            "decisions": [(d.event.step, d.action.value, d.rollback_to) for d in guard.decisions],
            "lr_caps": [d.lr_cap for d in guard.decisions],
            "global_step": trainer.global_step,
            "params_sha256": digest,
            "finite": all(bool(torch.isfinite(p).all()) for p in params),
            "checkpoint": guard.checkpoint_path,
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        }
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(result, f)


QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}


def start_rank(out, gate, **settings):
    """A rank's quiet, seeded start, and the guard every scenario runs with (also tests/sharded_worker.py's;
    ``settings``: more of the guard's arguments)."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    return LRGuard(
        snapshot_every=10,
        confirm_steps=3,
        max_rollbacks=2,
        checkpoint_dir=os.path.join(out, "ckpt"),
        gate=gate,
        **settings,
    )


def leave_group():
    """Destroy this rank's process group before the interpreter exits. Lightning destroys it at exit for NCCL only;
    a gloo group left to the interpreter's finalisation can abort the process ("terminate called without an active
    exception", exit -6; pytorch/pytorch#190489): one CI run of 500 lost a test to it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main():
    scenario, out = sys.argv[1], sys.argv[2]
    guard = start_rank(out, scenario in GATED, **SEARCHED.get(scenario, {}))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn" if scenario in SPAWNED else "ddp",
        max_steps=60,
        callbacks=[guard, WriteResult(guard, out)],
        **QUIET,
        default_root_dir=out,
    )
    warm_up = (lambda o: torch.optim.lr_scheduler.LinearLR(o, 0.1, 1.0, 60)) if scenario in WARMED_UP else None
    trainer.fit(RankScripted(SCENARIOS[scenario], warm_up))
    leave_group()


if __name__ == "__main__":
    main()
