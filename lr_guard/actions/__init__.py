"""Actions on a training run (torch only, no Lightning): LR cuts, snapshots and restore, skipped updates."""

from lr_guard.actions.lr import (
    LRChange,
    compose_with_scheduler,
    cut_lr,
    lr_factors,
    release_scheduler,
    set_lr_factors,
    set_min_lr,
)
from lr_guard.actions.skip import drop_gradients, restore_buffers, save_buffers
from lr_guard.actions.snapshot import Snapshot, capture_rng, restore_rng, take_snapshot
from lr_guard.actions.transfer import HostScalars

__all__ = [
    "HostScalars",
    "LRChange",
    "Snapshot",
    "capture_rng",
    "compose_with_scheduler",
    "cut_lr",
    "drop_gradients",
    "lr_factors",
    "release_scheduler",
    "restore_buffers",
    "restore_rng",
    "save_buffers",
    "set_lr_factors",
    "set_min_lr",
    "take_snapshot",
]
