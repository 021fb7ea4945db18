"""The live training run the guard's intents act on: a Lightning Trainer, its module and the guard's snapshots."""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Sequence
from typing import Any

import torch

from lr_guard.actions.snapshot_store import SnapshotStore, Targets
from lr_guard.callbacks.feed import ValueFeed

__all__ = ["LiveRun", "schedulers", "targets", "weight_averages"]

log = logging.getLogger("lr_guard")


def schedulers(trainer: Any) -> list[Any]:
    """The LR schedulers the Trainer steps, in its order."""
    return [config.scheduler for config in trainer.lr_scheduler_configs]


def targets(trainer: Any, module: Any) -> Targets:
    """What a snapshot of this run copies: the module, optimizers, schedulers, precision plugin (AMP) and the
    weight averages beside the model (:func:`weight_averages`)."""
    return Targets(module, trainer.optimizers, schedulers(trainer), trainer.precision_plugin, weight_averages(trainer))


_AVERAGING = frozenset(("WeightAveraging", "StochasticWeightAveraging"))  # Lightning's, in either namespace


def weight_averages(trainer: Any) -> list[dict[str, torch.Tensor]]:
    """The live tensors of each weight average the Trainer's callbacks keep -- Lightning's ``WeightAveraging``
    (``EMAWeightAveraging``) and ``StochasticWeightAveraging``: the averaged model's parameters and buffers and
    the count of models averaged (``n_averaged``), by name. They take in the weights after every step (or
    epoch), also during the steps a rollback discards, so a snapshot holds them and a rollback puts them back."""
    averages = []
    for callback in trainer.callbacks:
        if not _AVERAGING & {cls.__name__ for cls in type(callback).__mro__}:
            continue
        average = getattr(callback, "_average_model", None)
        if not isinstance(average, torch.nn.Module):
            continue  # not set up yet (outside fit)
        tensors = dict(average.state_dict())  # AveragedModel: its n_averaged is one of its buffers
        n_averaged = getattr(callback, "n_averaged", None)  # StochasticWeightAveraging: beside the model, once
        if isinstance(n_averaged, torch.Tensor):  # it averages (a rollback to before that zeroes it)
            tensors["n_averaged"] = n_averaged
        averages.append(tensors)
    return averages


class LiveRun:
    """A :class:`~lr_guard.executor.RunState` over a live Trainer: restoring puts a snapshot back in place,
    forgets the values read since and puts back the metrics the callbacks read (``trainer.callback_metrics``) as
    the snapshot's weights logged them; stopping writes the restored state as a Lightning checkpoint and ends the
    run, before the Trainer's ``min_steps`` / ``min_epochs`` if need be (training on would only diverge again,
    unwatched); :meth:`release` puts those settings back."""

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
        self.lrs: dict[int, list[list[float]]] = {}  # step -> the LR of every group it stepped with (note_lrs)
        self._minimums: tuple[int | None, int | None] | None = None  # the Trainer's, while a stop overrides them
        self.metrics: dict[int, dict[str, Any]] = {}  # snapshot step -> the callback metrics logged at that step
        self.metrics_due: int | None = None  # the step of the last snapshot, until its step's metrics are kept
        self._put_back: dict[str, tuple[Any, Any]] = {}  # name -> (what a discarded step logged, the restored)

    def snapshot_taken(self, step: int) -> None:
        """A snapshot of ``step`` was taken: what step ``step`` logs (its loss is that of the snapshot's weights)
        is kept with it, once the step is done (:meth:`note_metrics`)."""
        self.metrics_due = step

    def note_metrics(self) -> None:
        """The step of the last snapshot is done: keep the callback metrics it logged (copies on their device)."""
        step, self.metrics_due = self.metrics_due, None
        self.metrics = {s: m for s, m in self.metrics.items() if s in self.store}
        if step is not None:
            logged = self.trainer.callback_metrics
            self.metrics[step] = {
                k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in logged.items()
            }

    def take_snapshot(self) -> int:
        """Snapshot the state now, for an LR trial (beside the good snapshot: two copies); the step it holds."""
        step = self.trainer.global_step
        self.store.take(step, targets(self.trainer, self.module), 2)
        self.snapshot_taken(step)
        return step

    def locate(self, step: int) -> tuple[int, int] | None:
        """The epoch and batch index the update of ``step`` was trained on, where they were noted."""
        return self.where.get(step)

    def note_lrs(self, step: int) -> None:
        """Keep the LR of every param group of every optimizer at optimizer step ``step``, before it steps."""
        if step not in self.lrs:
            self.lrs[step] = [[float(g["lr"]) for g in o.param_groups] for o in self.trainer.optimizers]

    def lrs_at(self, step: int) -> list[list[float]] | None:
        return self.lrs.get(step)

    def forget_lrs(self, kept: Collection[int], after: int, recent: int = 0) -> None:
        """Keep the LRs of the steps ``kept`` (where the trouble under way began, where a plateau's progress
        stopped), of the last ``recent`` steps up to ``after`` (where a trouble seen later may have begun: a
        sustained rise's window) and of the steps after ``after`` (not checked yet)."""
        self.lrs = {s: lrs for s, lrs in self.lrs.items() if s > after - recent or s in kept}

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
        self.metrics_due = None
        logged = self.trainer.callback_metrics
        self._put_back = {k: (logged[k], v) for k, v in self.metrics.get(step, {}).items() if k in logged}
        self.put_back_metrics()

    def put_back_metrics(self) -> None:
        """What the discarded steps logged (a NaN loss), where nothing has logged it anew since the rollback, is
        read by the callbacks (EarlyStopping, ModelCheckpoint) as the restored weights logged it. Lightning writes
        a step's values back at the step's end, so this is done again at the epoch's end."""
        logged = self.trainer.callback_metrics
        for name, (stale, restored) in self._put_back.items():
            if name in logged and _same_value(logged[name], stale):
                logged[name] = restored

    def stop(self, step: int) -> str | None:
        self.restore(step)
        path = os.path.join(self.checkpoint_dir, f"last_good_step{step}.ckpt")
        self.trainer.save_checkpoint(path)
        self.trainer.should_stop = True
        self._end_before_the_minimums()
        self.checkpoint_path = path
        return path

    def _end_before_the_minimums(self) -> None:
        """Lightning ignores ``should_stop`` until ``min_steps`` and ``min_epochs`` are met: lift them for the rest
        of this run (they are put back by :meth:`release`)."""
        trainer = self.trainer
        loop = trainer.fit_loop
        min_epochs, min_steps = loop.min_epochs, loop.epoch_loop.min_steps
        if not (min_epochs or min_steps):
            return
        self._minimums = (min_epochs, min_steps)
        loop.min_epochs, loop.epoch_loop.min_steps = 0, None
        unmet = [
            f"{name}={value}"
            for name, value, done in (
                ("min_steps", min_steps, trainer.global_step),
                ("min_epochs", min_epochs, trainer.current_epoch),
            )
            if value and value > done
        ]
        if unmet and trainer.is_global_zero:
            log.warning(
                "lr_guard: training stops before the Trainer's %s: the guard's stop overrides it, since training "
                "on from here would diverge again with no guard watching",
                " and ".join(unmet),
            )

    def release(self) -> None:
        """The run is over: put back the Trainer's ``min_steps`` and ``min_epochs`` if a stop lifted them."""
        if self._minimums is not None:
            loop = self.trainer.fit_loop
            loop.min_epochs, loop.epoch_loop.min_steps = self._minimums
            self._minimums = None


def _same_value(a: Any, b: Any) -> bool:
    """Equal values, NaN equal to NaN (Lightning hands out a new tensor at every read of its metrics)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    same = a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
    return same and torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)
