"""The single-job guards: presets of ``LRGuard``'s settings with one policy switched on (the same logic, the same
validated configuration; ``factor`` is the setting of that job, read and written through to the policy)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

from lr_guard.actions.gate import UpdateGate
from lr_guard.callbacks.core import GuardCore
from lr_guard.callbacks.settings import Setting
from lr_guard.config import check_setting
from lr_guard.detectors import DivergenceDetector, PlateauDetector, SpikeDetector

__all__ = ["DivergenceRollbackCore", "PlateauLRReducerCore"]


class PlateauLRReducerCore(GuardCore):
    """Cuts the learning rate when the loss (or a logged metric) stops improving -- torch's
    ``ReduceLROnPlateau`` made noise-aware, working per step, and composing with the user's own scheduler.

    Args:
        monitor: ``None`` for the training loss, or a logged metric's name.
        check_on: ``"train_step"`` or ``"validation"`` (default: by ``monitor``, as ``LRGuard``).
        plateau: A configured ``PlateauDetector``, or ``True`` for the default one, sized to the run and its
            cadence (per validation: torch's rule, patience 5, threshold 1e-2; per step: a tenth of the run's steps).
        factor: LR factor per plateau, in (0, 1) (``LRGuard``'s ``plateau_factor``).
        min_lr: Floor of the cuts, one value or one per param group.
        eps: Smallest LR change made.
        check_every_n_steps, diagnostics, log_every_n_steps, verbose, dry_run: as ``LRGuard``.
    """

    factor = Setting("plateau_factor")

    def __init__(
        self,
        monitor: str | None = None,
        check_on: Literal["train_step", "validation"] | None = None,
        plateau: PlateauDetector | bool = True,
        factor: float = 0.5,
        min_lr: float | Sequence[float] = 0.0,
        eps: float = 1e-8,
        check_every_n_steps: int = 8,
        diagnostics: bool = True,
        log_every_n_steps: int | None = None,
        verbose: bool = True,
        dry_run: bool = False,
    ) -> None:
        if plateau is False:
            raise ValueError("plateau must be a PlateauDetector or True: a plateau LR reducer needs its detector")
        if factor is None:
            raise ValueError("factor must be a number in (0, 1): a plateau LR reducer that never cuts does nothing")
        factor = check_setting("plateau_factor", factor, "factor")  # named as this class's argument
        super().__init__(
            monitor=monitor,
            check_on=check_on,
            spike=False,
            oscillation=False,
            plateau=plateau,
            divergence=False,
            gate=False,  # a plateau LR reducer changes LRs only; LRGuard and DivergenceRollback gate the updates
            plateau_factor=factor,
            oscillation_factor=None,
            rollback=False,
            min_lr=min_lr,
            eps=eps,
            check_every_n_steps=check_every_n_steps,
            diagnostics=diagnostics,
            log_every_n_steps=log_every_n_steps,
            verbose=verbose,
            dry_run=dry_run,
        )


class DivergenceRollbackCore(GuardCore):
    """Rolls back to the last good state when training diverges, with a lower LR, optionally skipping batches;
    stops with a loadable checkpoint after ``max_rollbacks`` failed retries. Spikes are watched too (logged), so
    that no snapshot taken while a spike was under way counts as good.

    Args: as ``LRGuard``; ``factor`` is its ``rollback_factor``. The update gate is on by default, as in
    ``LRGuard`` (``gate=False`` turns it off).
    """

    factor = Setting("rollback_factor")

    def __init__(
        self,
        monitor: str | None = None,
        check_on: Literal["train_step", "validation"] | None = None,
        divergence: DivergenceDetector | bool = True,
        spike: SpikeDetector | bool = True,
        factor: float = 0.5,
        skip_batches: int = 0,
        max_rollbacks: int = 3,
        keep_lr_on_bad_batch: bool = True,
        warmup_cap_factor: float | None = 0.1,
        skip_spikes: bool = False,
        snapshot_every: int = 50,
        confirm_steps: int = 10,
        check_every_n_steps: int = 8,
        min_lr: float | Sequence[float] = 0.0,
        eps: float = 1e-8,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        snapshot_device: Literal["cpu", "same", "disk"] = "cpu",
        snapshot_memory_budget: int | None = None,
        snapshot_dir: str | os.PathLike[str] | None = None,
        diagnostics: bool = True,
        log_every_n_steps: int | None = None,
        verbose: bool = True,
        dry_run: bool = False,
        gate: UpdateGate | bool | None = None,
    ) -> None:
        if divergence is False:
            raise ValueError("divergence must be a DivergenceDetector or True: a rollback needs its detector")
        factor = check_setting("rollback_factor", factor, "factor")  # named as this class's argument
        super().__init__(
            monitor=monitor,
            check_on=check_on,
            spike=spike,
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
            warmup_cap_factor=warmup_cap_factor,
            skip_spikes=skip_spikes,
            snapshot_every=snapshot_every,
            confirm_steps=confirm_steps,
            check_every_n_steps=check_every_n_steps,
            min_lr=min_lr,
            eps=eps,
            checkpoint_dir=None if checkpoint_dir is None else os.fspath(checkpoint_dir),
            snapshot_device=snapshot_device,
            snapshot_memory_budget=snapshot_memory_budget,
            snapshot_dir=None if snapshot_dir is None else os.fspath(snapshot_dir),
            diagnostics=diagnostics,
            log_every_n_steps=log_every_n_steps,
            verbose=verbose,
            dry_run=dry_run,
            gate=gate,
        )
