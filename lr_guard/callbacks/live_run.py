"""The live training run the guard's intents act on: a Lightning Trainer, its module and the guard's snapshots."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from lr_guard.actions.snapshot_store import SnapshotStore, Targets
from lr_guard.callbacks.feed import ValueFeed

__all__ = ["LiveRun", "schedulers", "targets"]


def schedulers(trainer: Any) -> list[Any]:
    """The LR schedulers the Trainer steps, in its order."""
    return [config.scheduler for config in trainer.lr_scheduler_configs]


def targets(trainer: Any, module: Any) -> Targets:
    """What a snapshot of this run copies: the module, optimizers, schedulers and precision plugin (AMP)."""
    return Targets(module, trainer.optimizers, schedulers(trainer), trainer.precision_plugin)


class LiveRun:
    """A :class:`~lr_guard.executor.RunState` over a live Trainer: restoring puts a snapshot back in place and
    forgets the values read since; stopping writes the restored state as a Lightning checkpoint."""

    def __init__(
        self, trainer: Any, module: Any, store: SnapshotStore, feed: ValueFeed, checkpoint_dir: str | None
    ) -> None:
        self.trainer = trainer
        self.module = module
        self.store = store
        self.feed = feed
        self.checkpoint_dir = checkpoint_dir or os.path.join(trainer.default_root_dir, "lr_guard_checkpoints")
        self.checkpoint_path: str | None = None
        self.where: dict[int, tuple[int, int]] = {}  # step -> (epoch, batch index), kept while the gate is on

    def locate(self, step: int) -> tuple[int, int] | None:
        """The epoch and batch index the update of ``step`` was trained on, where they were noted."""
        return self.where.get(step)

    def forget_before(self, step: int) -> None:
        """Steps before ``step`` are dealt with: their places are no longer needed."""
        if self.where:
            self.where = {s: w for s, w in self.where.items() if s >= step}

    @property
    def optimizers(self) -> Sequence[Any]:
        return self.trainer.optimizers

    @property
    def step(self) -> int:
        return self.trainer.global_step

    def restore(self, step: int) -> None:
        self.store.restore(step, targets(self.trainer, self.module))
        self.feed.clear()

    def stop(self, step: int) -> str | None:
        self.restore(step)
        path = os.path.join(self.checkpoint_dir, f"last_good_step{step}.ckpt")
        self.trainer.save_checkpoint(path)
        self.trainer.should_stop = True
        self.checkpoint_path = path
        return path
