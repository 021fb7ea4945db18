"""The single-job guards: the same logic as ``LRGuard``, with only one policy switched on."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

from lr_guard.callbacks.core import GuardCore
from lr_guard.detectors import DivergenceDetector, PlateauDetector

__all__ = ["DivergenceRollbackCore", "PlateauLRReducerCore"]


class PlateauLRReducerCore(GuardCore):
    """Cuts the learning rate when the loss (or a logged metric) stops improving -- torch's
    ``ReduceLROnPlateau`` made noise-aware, working per step, and composing with the user's own scheduler.

    Args:
        monitor: ``None`` for the training loss, or a logged metric's name.
        check_on: ``"train_step"`` or ``"validation"`` (default: by ``monitor``, as ``LRGuard``).
        plateau: A configured ``PlateauDetector``, or ``True`` for the default one.
        factor: LR factor per plateau, in (0, 1).
        min_lr: Floor of the cuts, one value or one per param group.
        eps: Smallest LR change made.
        verbose: Log every cut.
    """

    def __init__(
        self,
        monitor: str | None = None,
        check_on: Literal["train_step", "validation"] | None = None,
        plateau: PlateauDetector | bool = True,
        factor: float = 0.5,
        min_lr: float | Sequence[float] = 0.0,
        eps: float = 1e-8,
        verbose: bool = True,
    ) -> None:
        if plateau is False:
            raise ValueError("plateau must be a PlateauDetector or True: a plateau LR reducer needs its detector")
        super().__init__(
            monitor=monitor,
            check_on=check_on,
            spike=False,
            oscillation=False,
            plateau=plateau,
            divergence=False,
            plateau_factor=factor,
            oscillation_factor=None,
            rollback=False,
            min_lr=min_lr,
            eps=eps,
            verbose=verbose,
        )
        self.factor = factor


class DivergenceRollbackCore(GuardCore):
    """Rolls back to the last good state when training diverges, with a lower LR, optionally skipping batches;
    stops with a loadable checkpoint after ``max_rollbacks`` failed retries. Spikes are watched too (logged), so
    that no snapshot taken while a spike was under way counts as good.

    Args: as ``LRGuard``; ``factor`` is its ``rollback_factor``.
    """

    def __init__(
        self,
        monitor: str | None = None,
        check_on: Literal["train_step", "validation"] | None = None,
        divergence: DivergenceDetector | bool = True,
        factor: float = 0.5,
        skip_batches: int = 0,
        max_rollbacks: int = 3,
        keep_lr_on_bad_batch: bool = True,
        snapshot_every: int = 50,
        confirm_steps: int = 10,
        check_every_n_steps: int = 8,
        min_lr: float | Sequence[float] = 0.0,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        snapshot_device: Literal["cpu", "same"] = "cpu",
        verbose: bool = True,
    ) -> None:
        if divergence is False:
            raise ValueError("divergence must be a DivergenceDetector or True: a rollback needs its detector")
        super().__init__(
            monitor=monitor,
            check_on=check_on,
            spike=True,
            oscillation=False,
            plateau=False,
            divergence=divergence,
            plateau_factor=None,
            oscillation_factor=None,
            rollback=True,
            rollback_factor=factor,
            skip_batches=skip_batches,
            max_rollbacks=max_rollbacks,
            keep_lr_on_bad_batch=keep_lr_on_bad_batch,
            snapshot_every=snapshot_every,
            confirm_steps=confirm_steps,
            check_every_n_steps=check_every_n_steps,
            min_lr=min_lr,
            checkpoint_dir=None if checkpoint_dir is None else os.fspath(checkpoint_dir),
            snapshot_device=snapshot_device,
            verbose=verbose,
        )
        self.factor = factor
