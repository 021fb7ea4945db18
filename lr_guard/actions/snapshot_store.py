"""The snapshots a guard holds: taken, restored, freed for reuse, fenced, and cleaned up -- whatever their storage.

A :class:`SnapshotStore` keeps snapshots by step in the storage its ``device`` names (``"cpu"``, ``"same"`` or
``"disk"``), reuses the buffers (or the file) of a snapshot the rules no longer need, and moves to disk, with a
warning, once the copies it must keep would exceed a host-memory budget. It knows nothing of Lightning: the
caller hands it the model, optimizers, schedulers and precision plugin of the run (:class:`Targets`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from lr_guard.actions.disk_snapshot import DiskSnapshot, remove_snapshot_files, take_disk_snapshot
from lr_guard.actions.snapshot import Snapshot, take_snapshot
from lr_guard.actions.state_io import FULL_STATE, StateIO, state_nbytes

__all__ = ["DISK_SLOTS", "SnapshotStore", "Targets"]

DISK_SLOTS = 4  # a good, a pending, a starting state (origin) and a progress mark may be held at once


@dataclass(frozen=True)
class Targets:
    """The live objects a snapshot copies and restores."""

    model: nn.Module
    optimizers: Sequence[Any]
    schedulers: Sequence[Any]
    precision: Any | None = None
    averages: Sequence[dict[str, Any]] = ()  # weight averages beside the model (EMA, SWA): live tensors by name


class SnapshotStore:
    """Snapshots by step.

    Args:
        device: ``"cpu"`` (host memory), ``"same"`` (beside the weights) or ``"disk"`` (files in ``directory``).
        memory_budget: Bytes of host memory ``"cpu"`` snapshots may take (``None``: no limit); checked at every
            snapshot against ``copies`` full copies; over it, later snapshots go to disk.
        directory: Where disk snapshots go (needed for ``"disk"`` and for a budget).
        rank: The process's rank, in the disk files' names.
        state_io: How model and optimizer state are read and written (the seam for sharded strategies).
    """

    def __init__(
        self,
        device: str = "cpu",
        memory_budget: int | None = None,
        directory: str | None = None,
        rank: int = 0,
        state_io: StateIO = FULL_STATE,
    ) -> None:
        self.device = device
        self.memory_budget = memory_budget
        self.directory = directory
        self.rank = rank
        self.state_io = state_io
        self.storage = device  # becomes "disk" when the host copies would exceed the budget
        self._held: dict[int, Snapshot] = {}
        self._spare: Snapshot | None = None  # a snapshot no longer needed: its buffers (or file) are reused
        self.copying: list[Snapshot] = []  # snapshots whose copies may still be running on a side stream (GPU)
        self._files: set[str] = set()  # disk files written: removed by close()

    def __contains__(self, step: object) -> bool:
        return step in self._held

    def __len__(self) -> int:
        return len(self._held)

    @property
    def steps(self) -> list[int]:
        return sorted(self._held)

    def take(self, step: int, targets: Targets, copies: int = 2) -> Snapshot:
        """Snapshot the targets as the state of ``step``; ``copies``: how many full copies the rules may keep
        (for the memory budget)."""
        self._check_budget(targets, copies)
        spare, self._spare = self._spare, None
        if self.storage == "disk":
            snapshot: Snapshot = self._take_on_disk(step, targets, spare)
        else:
            snapshot = take_snapshot(
                step,
                targets.model,
                targets.optimizers,
                targets.schedulers,
                precision=targets.precision,
                device=self.storage,
                reuse=spare if spare is not None and not isinstance(spare, DiskSnapshot) else None,
                state_io=self.state_io,
                averages=targets.averages,
            )
        if snapshot.copying:
            self.copying.append(snapshot)
        self._held[step] = snapshot
        return snapshot

    def _take_on_disk(self, step: int, targets: Targets, spare: Snapshot | None) -> DiskSnapshot:
        if self.directory is None:
            raise ValueError("disk snapshots need a directory: pass snapshot_dir")
        in_use = {s.path for s in self._held.values() if isinstance(s, DiskSnapshot)}
        if isinstance(spare, DiskSnapshot):
            path = spare.path
        else:
            names = (os.path.join(self.directory, f"rank{self.rank}_slot{i}.bin") for i in range(DISK_SLOTS))
            path = next(p for p in map(os.path.abspath, names) if p not in in_use)
        slot = os.path.basename(path)[: -len(".bin")]
        written = take_disk_snapshot(
            step,
            targets.model,
            targets.optimizers,
            targets.schedulers,
            os.path.dirname(path),
            slot,
            precision=targets.precision,
            state_io=self.state_io,
            averages=targets.averages,
        )
        self._files.add(written.path)
        return written

    def _check_budget(self, targets: Targets, copies: int) -> None:
        """Send snapshots to disk once the host copies the rules keep would exceed the budget. Checked at every
        snapshot, not once at the start: an optimizer's state (Adam's moments) only appears with its first step."""
        if self.storage != "cpu" or self.memory_budget is None:
            return
        needed = copies * state_nbytes(targets.model, targets.optimizers, self.state_io)
        if needed > self.memory_budget:
            self.storage = "disk"
            warnings.warn(
                f"lr_guard: {copies} snapshots of this training state need {needed / 1e9:.2f} GB of host memory, "
                f"over snapshot_memory_budget={self.memory_budget / 1e9:.2f} GB; writing them to disk instead "
                f"({self.directory})",
                UserWarning,
                stacklevel=3,
            )

    def fence(self) -> None:
        """Before the weights change: the compute stream waits for copies still running (GPU; no host sync)."""
        if self.copying:
            for snapshot in self.copying:
                snapshot.fence()
            self.copying = []

    def restore(self, step: int, targets: Targets) -> None:
        """Write the snapshot of ``step`` back into the targets; the snapshots of later steps are dropped (they
        hold states the run has left), those of earlier ones stay restorable (states the run went through)."""
        snapshot = self._held[step]
        snapshot.restore(
            targets.model,
            targets.optimizers,
            targets.schedulers,
            precision=targets.precision,
            state_io=self.state_io,
            averages=targets.averages,
        )
        self._held = {s: held for s, held in self._held.items() if s <= step}

    def keep_only(self, steps: Iterable[int]) -> None:
        """Free the snapshots not in ``steps``; the last one freed is reused by the next :meth:`take`."""
        if len(self._held) <= 1:
            return
        keep = set(steps)
        for step in [s for s in self._held if s not in keep]:
            self._spare = self._held.pop(step)

    def close(self) -> None:
        """Forget every snapshot and remove the disk files written (scratch as large as the training state,
        unreadable once the process has ended), once their writers have finished."""
        self._held = {}
        self._spare = None
        self.copying = []
        for path in sorted(self._files):
            remove_snapshot_files(path)
        self._files = set()
