"""``find_lr``: the LR range test on a Lightning Trainer, from a snapshot that is restored afterwards.

The sweep is one short ``trainer.fit`` with only the sweep's callback: no other callback, logger, validation or
LR scheduler runs in it. Before it, lr_guard's :func:`~lr_guard.actions.snapshot.take_snapshot` copies the model,
the Trainer's optimizers and schedulers (those of an earlier fit, if any), the precision plugin and the RNG
states; after it (also when it raises), the snapshot is written back in place and the Trainer gets back its own
callbacks, loggers, optimizers, schedulers, validation limit and fit-loop progress (so ``global_step`` too), as
Lightning's ``Tuner.lr_find`` does. The fit then runs as if the sweep had never happened.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytorch_lightning as pl
import torch

from lr_guard.actions.snapshot import take_snapshot
from lr_guard.detectors.base import Detector, check_number
from lr_guard.detectors.divergence import DivergenceDetector
from lr_guard.range_test import RangeTestResult, read_sweep

__all__ = ["find_lr", "sweep_divergence_detector"]


def sweep_divergence_detector() -> DivergenceDetector:
    """The divergence detector fit for a sweep: the LR only rises, so a loss 4x its best level (Lightning's
    ``early_stop_threshold``) for 3 values in a row, or 10x at once, will not come back; no trend test (a sweep
    is too short for one, and its slow rise is what the threshold reads)."""
    return DivergenceDetector(
        factor=4.0, instant_factor=10.0, instant_confirm=1, patience=3, trend_window=0, warmup_steps=5
    )


def _lightning_modules() -> tuple[type[torch.nn.Module], ...]:
    """``LightningModule`` of ``pytorch_lightning`` and, where installed, of ``lightning.pytorch``."""
    try:
        from lightning.pytorch import LightningModule
    except ImportError:  # pragma: no cover - depends on the environment
        return (pl.LightningModule,)
    return (pl.LightningModule, LightningModule)


class _SweepCallback(pl.Callback):
    """Sets the LR of each sweep step before its first micro-batch, records the step's loss, stops on divergence."""

    def __init__(self, lrs: list[float], detector: Detector) -> None:
        self.lrs, self.detector = lrs, detector
        self.losses: list[float] = []
        self.stopped_at: int | None = None
        self._start = 0
        self._ratios: list[list[float]] = []
        self._loss: torch.Tensor | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        trainer.strategy.lr_scheduler_configs = []  # the sweep sets every LR itself
        if not trainer.optimizers:
            raise ValueError("find_lr needs an optimizer: configure_optimizers returned none")
        first = trainer.optimizers[0].param_groups[0]["lr"]
        if not first > 0:
            raise ValueError(
                f"find_lr keeps each param group's LR ratio to the first group's, whose LR is {first!r}; "
                "configure_optimizers must give it an LR > 0"
            )
        self._ratios = [[g["lr"] / first for g in o.param_groups] for o in trainer.optimizers]
        self._start = trainer.global_step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        k = trainer.global_step - self._start
        lr = self.lrs[min(k, len(self.lrs) - 1)]
        for optimizer, ratios in zip(trainer.optimizers, self._ratios, strict=True):
            for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
                group["lr"] = lr * ratio

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            raise ValueError(
                "find_lr reads the loss training_step returns (a tensor, or a dict with 'loss'); "
                f"training_step returned {type(outputs).__name__}"
            )
        loss = (
            loss.detach()
        )  # Lightning divides each micro-batch's loss by accumulate_grad_batches: the sum is the mean
        self._loss = loss if self._loss is None else self._loss + loss
        k = trainer.global_step - self._start
        if k <= len(self.losses):  # the optimizer step has not happened yet (accumulating)
            return
        value = float(self._loss)
        self._loss = None
        self.losses.append(value)
        event = self.detector.update(value, k - 1)
        if event is not None or not math.isfinite(value):  # a blow-up the next value confirmed began before it
            self.stopped_at = k - 1 if event is None or event.began is None else event.began
            trainer.should_stop = True


def find_lr(
    trainer: Any,
    model: Any,
    train_dataloaders: Any = None,
    datamodule: Any = None,
    *,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    num_steps: int = 100,
    divergence: Detector | None = None,
) -> RangeTestResult:
    """Run an LR range test: ``num_steps`` optimizer steps whose LR grows exponentially from ``min_lr`` to
    ``max_lr``, from a snapshot of the model that is restored afterwards (see :mod:`lr_guard.range_test` for how
    the threshold, the steepest descent and the suggestion are read from it).

    Args:
        trainer: The Trainer the model will be trained with (its accelerator, precision and gradient settings are
            the sweep's). Its callbacks, loggers, validation and LR schedulers do not run during the sweep.
        model: The LightningModule; its ``configure_optimizers`` gives the optimizer swept. With several param
            groups (or optimizers), the first group's LR is swept and the others keep their ratio to it.
        train_dataloaders: As for ``trainer.fit``.
        datamodule: As for ``trainer.fit``.
        min_lr: The LR of the first step (> 0).
        max_lr: The LR of the last step (> ``min_lr``).
        num_steps: Optimizer steps of the sweep (>= 10).
        divergence: The detector that stops the sweep once the loss diverges; ``None`` for
            :func:`sweep_divergence_detector`'s. A non-finite loss always stops it.

    Returns:
        A :class:`~lr_guard.range_test.RangeTestResult`; its ``plot()`` draws the sweep.
    """
    check_number("min_lr", min_lr, low=0.0, low_open=True)
    check_number("max_lr", max_lr, low=0.0, low_open=True)
    if not max_lr > min_lr:
        raise ValueError(f"max_lr must be greater than min_lr; got min_lr={min_lr!r}, max_lr={max_lr!r}")
    check_number("num_steps", num_steps, low=10, integer=True)
    if divergence is not None and not isinstance(divergence, Detector):
        raise TypeError(
            f"divergence must be a lr_guard Detector (e.g. DivergenceDetector(...)) or None; got {divergence!r}"
        )
    if getattr(trainer, "fast_dev_run", False):
        raise ValueError(
            f"find_lr cannot sweep on a Trainer with fast_dev_run={trainer.fast_dev_run!r} (it runs one batch); "
            "build the Trainer without fast_dev_run for the sweep"
        )
    if not isinstance(model, _lightning_modules()):
        raise TypeError(f"model must be a LightningModule; got {type(model).__name__}")
    detector = divergence if divergence is not None else sweep_divergence_detector()
    detector.reset()
    lrs = [min_lr * (max_lr / min_lr) ** (k / (num_steps - 1)) for k in range(num_steps)]
    sweep = _SweepCallback(lrs, detector)

    loop = trainer.fit_loop
    saved = {
        "callbacks": trainer.callbacks,
        "loggers": trainer.loggers,
        "optimizers": trainer.strategy.optimizers,
        "lr_scheduler_configs": trainer.strategy.lr_scheduler_configs,
        "limit_val_batches": trainer.limit_val_batches,
        "max_steps": loop.epoch_loop.max_steps,
        "min_steps": loop.epoch_loop.min_steps,
        "max_epochs": loop.max_epochs,
        "min_epochs": loop.min_epochs,
        "loop": copy.deepcopy(loop.state_dict()),
    }
    schedulers = [c.scheduler for c in trainer.strategy.lr_scheduler_configs]
    precision = trainer.strategy.precision_plugin
    snapshot = take_snapshot(trainer.global_step, model, trainer.optimizers, schedulers, precision)
    trainer.callbacks = [sweep]
    trainer.loggers = []
    trainer.limit_val_batches = 0
    loop.epoch_loop.max_steps = trainer.global_step + num_steps  # however many epochs that takes, and no
    loop.epoch_loop.min_steps, loop.max_epochs, loop.min_epochs = None, -1, None  # minimum that holds off the stop
    try:
        trainer.fit(model, train_dataloaders=train_dataloaders, datamodule=datamodule)
    finally:
        trainer.callbacks = saved["callbacks"]
        trainer.loggers = saved["loggers"]
        trainer.strategy.optimizers = saved["optimizers"]
        trainer.strategy.lr_scheduler_configs = saved["lr_scheduler_configs"]
        trainer.limit_val_batches = saved["limit_val_batches"]
        loop.epoch_loop.max_steps = saved["max_steps"]
        loop.epoch_loop.min_steps, loop.max_epochs = saved["min_steps"], saved["max_epochs"]
        loop.min_epochs = saved["min_epochs"]
        loop.load_state_dict(copy.deepcopy(saved["loop"]))
        loop.restarting = False
        loop.epoch_loop.restarting = False
        trainer.should_stop = False
        loop._combined_loader = None  # the next fit builds its data loaders afresh, as after Lightning's lr_find
        snapshot.restore(model, saved["optimizers"], schedulers, precision)
    return read_sweep(lrs[: len(sweep.losses)], sweep.losses, sweep.stopped_at)
