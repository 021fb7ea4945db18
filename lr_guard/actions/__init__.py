"""Actions on a training run (torch only, no Lightning): LR cuts, snapshots and restore (and the store that holds
them), skipped updates, watched values brought to the host.

The submodules are imported on first use, so reading LR factors (``lr_guard.actions.lr``, no torch) does not
import torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lr_guard.actions.lr import (
        LRChange,
        compose_with_scheduler,
        cut_lr,
        lr_factors,
        release_scheduler,
        set_lr_factors,
        set_min_lr,
        set_scheduled_lr,
    )
    from lr_guard.actions.skip import drop_gradients, restore_buffers, save_buffers
    from lr_guard.actions.snapshot import Snapshot, capture_rng, restore_rng, take_snapshot
    from lr_guard.actions.snapshot_store import SnapshotStore, Targets
    from lr_guard.actions.state_io import FULL_STATE, StateIO
    from lr_guard.actions.transfer import HostScalars

__all__ = [
    "FULL_STATE",
    "HostScalars",
    "LRChange",
    "Snapshot",
    "SnapshotStore",
    "StateIO",
    "Targets",
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
    "set_scheduled_lr",
    "take_snapshot",
]

# the submodules, cheapest first: lr needs no torch, so the LR functions are found without importing it
_SUBMODULES = ("lr", "skip", "snapshot", "snapshot_store", "state_io", "transfer")


def __getattr__(name: str) -> Any:
    if name in __all__:
        for submodule in _SUBMODULES:
            module = importlib.import_module(f"lr_guard.actions.{submodule}")
            if name in module.__all__:
                value = getattr(module, name)
                globals()[name] = value  # looked up once
                return value
    raise AttributeError(f"module 'lr_guard.actions' has no attribute {name!r}")
