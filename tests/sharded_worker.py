"""A real 2-process FSDP2 run (torch's ``fully_shard`` under Lightning's ``ModelParallelStrategy``, gloo on CPU)
for tests/test_sharded.py; Lightning's launcher re-runs this script once per rank. Each rank writes what it saw
and did to OUT/rank{r}.json, and its local shards at the snapshot and after each rollback to OUT/rank{r}_*.pt.

    python tests/sharded_worker.py SCENARIO OUT_DIR [CHECKPOINT]
"""

import json
import os
import sys

import pytorch_lightning as pl
import torch
from ddp_worker import QUIET, SCENARIOS, RankScripted, leave_group, start_rank
from pytorch_lightning.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

SHARDED_SCENARIOS = {
    **SCENARIOS,
    "resume": {},
    "resume_full": {},
    "always_nan_on_rank0_full": SCENARIOS["always_nan_on_rank0"],
    "nan_on_rank1_disk": SCENARIOS["nan_on_rank1"],
    "nan_at_step5_on_rank0": {0: {5: float("nan")}},  # back to the start: no optimizer state there yet
}
GATED = {"gate_nan_on_rank1"}
FULL_CHECKPOINT = {"always_nan_on_rank0_full", "resume_full"}  # save_distributed_checkpoint=False: one file


class ShardedScripted(RankScripted):
    """The scripted loss with per-rank faults, its layers sharded by ``fully_shard`` over the data-parallel mesh."""

    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def local_state(trainer, module):
    """This rank's own tensors: its shards of the parameters and of the optimizer state, and the buffers."""

    def local(t):
        return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()

    state = {f"model/{k}": local(v) for k, v in module.state_dict().items()}
    for i, entry in trainer.optimizers[0].state.items():
        name = next(n for n, p in module.named_parameters() if p is i)
        state.update({f"optimizer/{name}/{k}": local(v) for k, v in entry.items()})
    return state


class RecordShards(pl.Callback):
    """Keeps each rank's local tensors at every snapshot step and right after each rollback (after the guard's
    hook, which runs first), and writes the result at the end of fit."""

    def __init__(self, guard, out):
        self.guard, self.out = guard, out
        self.at_snapshot, self.after_rollback, self.rollbacks = {}, [], 0
        self.snapshot_bytes = []  # what the guard's snapshots held at the last snapshot step

    def on_train_start(self, trainer, pl_module):
        self.at_snapshot[trainer.global_step] = local_state(trainer, pl_module)
        torch.save(self.at_snapshot[trainer.global_step], self._path(trainer, "start"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.guard.snapshot_every == 0:
            self.at_snapshot[step] = local_state(trainer, pl_module)
            self.snapshot_bytes = [s.nbytes for s in self.guard._store._held.values()]
        if self.guard.counts["rollbacks"] > self.rollbacks:
            self.rollbacks = self.guard.counts["rollbacks"]
            self.after_rollback.append(local_state(trainer, pl_module))

    def teardown(self, trainer, pl_module, stage):
        rank = trainer.global_rank
        decisions = [(d.event.step, d.action.value, d.rollback_to) for d in self.guard.decisions]
        restored = [d.rollback_to for d in self.guard.decisions if d.rollback_to is not None]
        matches = []
        for step, state in zip(restored, self.after_rollback, strict=False):
            saved = self.at_snapshot.get(step)
            same = saved is not None and saved.keys() == state.keys()
            same = same and all(torch.equal(saved[k], state[k]) for k in saved)
            matches.append([step, same, sorted(state)])
        params = [p.to_local() for p in pl_module.parameters()]
        result = {
            "rank": rank,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "state_io": type(self.guard._store.state_io).__name__,
            "decisions": decisions,
            "restored_equal_snapshot": matches,
            "global_step": trainer.global_step,
            "finite": all(bool(torch.isfinite(p).all()) for p in params),
            "local_numel": sum(p.numel() for p in params),
            "snapshot_bytes": self.snapshot_bytes,
            "local_bytes": sum(t.numel() * t.element_size() for t in local_state(trainer, pl_module).values()),
            "checkpoint": self.guard.checkpoint_path,
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        }
        torch.save(local_state(trainer, pl_module), self._path(trainer, "end"))
        with open(os.path.join(self.out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)

    def _path(self, trainer, what):
        return os.path.join(self.out, f"rank{trainer.global_rank}_{what}.pt")


def main():
    scenario, out = sys.argv[1], sys.argv[2]
    checkpoint = sys.argv[3] if len(sys.argv) > 3 else None
    guard = start_rank(out, scenario in GATED, snapshot_device="disk" if scenario.endswith("_disk") else "cpu")
    strategy = ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=scenario not in FULL_CHECKPOINT
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=60 if checkpoint is None else 50,
        callbacks=[guard, RecordShards(guard, out)],
        **QUIET,
        default_root_dir=out,
    )
    trainer.fit(ShardedScripted(SHARDED_SCENARIOS[scenario]), ckpt_path=checkpoint)
    leave_group()


if __name__ == "__main__":
    main()
