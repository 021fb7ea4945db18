"""The value feed: what the guard watches, gathered on the device and brought to the host in batches.

:class:`ValueFeed` collects, for every optimizer step, the values of the signals the detectors read -- the
``"loss"`` (the mean training loss of the step's micro-batches, or the monitored metric) and any other signal
named after a metric the user logs -- as tensors, without reading them. At a check it sends them on their way to
the host, one copy for all of them (and under DDP one collective: the mean over ranks, so every rank's detectors hold
the same state and take the same decisions on the same step), and hands out the values that have arrived.
"""

from __future__ import annotations

from typing import Any

import torch

from lr_guard.actions import HostScalars
from lr_guard.config import GuardConfig
from lr_guard.policy import LOSS

__all__ = ["ValueFeed"]


def missing_metric(owner: str, setting: str, name: str, metrics: Any) -> RuntimeError:
    return RuntimeError(
        f"{owner} is watching {setting}={name!r}, which is not among the logged metrics. Log it with "
        f"self.log({name!r}, ...) or pass one of: {', '.join(sorted(metrics)) or '(no metric is logged yet)'}"
    )


class ValueFeed:
    """Watched values by step, on their way from the device to the host.

    Args:
        config: The guard's settings; its ``monitor`` is ``None`` to watch the training loss as the ``"loss"``
            signal, or the name of a logged metric.
        signals: The other signals the detectors read, each a metric the user logs (read after every step).
        owner: The guard's class name, for error messages.
    """

    def __init__(
        self, config: GuardConfig, signals: set[str], owner: str, pushed: frozenset[str] = frozenset()
    ) -> None:
        self.config = config
        self.pushed = set(pushed)  # signals handed in by the guard's own parts (the gate), not read from metrics
        self.extra = sorted((set(signals) | self.pushed) - {LOSS})
        self.read = [name for name in self.extra if name not in self.pushed]  # read from callback_metrics
        self.owner = owner
        self.world_size = 1
        self.reset()

    def reset(self, world_size: int = 1) -> None:
        self.world_size = world_size
        lag = 1 if world_size > 1 else None  # under DDP every rank hands a batch out at the same step
        self._host = HostScalars(fixed_lag=lag)  # one transfer per check for all signals
        self._accumulated: torch.Tensor | None = None
        self._unread: list[tuple[int, str, Any]] = []  # (step, signal, value: a tensor or a float), not read yet

    # -- gathering ---------------------------------------------------------------------------------------------
    def add_micro_batch(self, outputs: Any) -> None:
        """The loss ``training_step`` returned for one micro-batch (a detached copy: no graph is kept)."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._accumulated = loss if self._accumulated is None else self._accumulated + loss

    def end_step(self, step: int, trainer: Any, read_loss: bool) -> None:
        """Optimizer step ``step`` is done: keep its values (not read yet). ``read_loss=False``: the loss signal
        is read at validation instead."""
        if read_loss:
            monitor = self.config.monitor
            value = self._accumulated if monitor is None else self.metric(trainer, monitor)
            if value is not None:
                self._unread.append((step, LOSS, value))
        self._accumulated = None
        if self.read:
            metrics = trainer.callback_metrics
            for name in self.read:
                if name in metrics:
                    value = metrics[name]
                    tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                    self._unread.append((step, name, tensor))

    def add(self, step: int, name: str, value: float | torch.Tensor) -> None:
        """A value of a pushed signal at ``step`` (e.g. the gate's verdict and the gradient norm)."""
        self._unread.append((step, name, value))

    def metric(self, trainer: Any, name: str) -> torch.Tensor:
        metrics = trainer.callback_metrics
        if name not in metrics:
            setting = "monitor" if name == self.config.monitor else "signal"
            raise missing_metric(self.owner, setting, name, metrics)
        value = metrics[name]
        return value if isinstance(value, torch.Tensor) else torch.tensor(float(value))

    def push_now(self, trainer: Any, step: int, value: torch.Tensor) -> None:
        """A loss value read outside the step loop (after validation), sent at once."""
        key: Any = (step, LOSS) if self.extra else step
        self._host.push([key], self.agreed(trainer, value).reshape(1))

    # -- bringing to the host ----------------------------------------------------------------------------------
    def send(self, trainer: Any) -> None:
        """Send the values gathered since the last check to the host: one batch (one copy, under DDP one
        collective) for every signal."""
        unread, self._unread = self._unread, []
        if not unread:
            return
        # the key of a value: its step, or with other signals (step, signal)
        keys: list[Any] = [(s, n) for s, n, _ in unread] if self.extra else [s for s, _, _ in unread]
        device = next((v.device for _, _, v in unread if isinstance(v, torch.Tensor) and v.is_cuda), None)
        if self.world_size > 1 or device is not None:
            values = [_scalar(v, device) for _, _, v in unread]
            self._host.push(keys, self.agreed(trainer, torch.stack(values).float()))
        else:  # on the host already: reading a value costs no more than a Python float
            self._host.push(keys, [_number(v) for _, _, v in unread])

    def arrived(self, wait: bool = False) -> list[tuple[int, Any]]:
        """``(step, value)`` for every step whose values have arrived, oldest first (all of them with ``wait``):
        the loss as a float, or with other signals a mapping of signal name to value. All signals of a step
        travel in one batch, so they arrive together."""
        ready = self._host.drain() if wait else self._host.ready()
        if not self.extra:
            return ready
        by_step: dict[int, dict[str, float]] = {}
        for (step, name), value in ready:
            by_step.setdefault(step, {})[name] = value
        return sorted(by_step.items())

    def agreed(self, trainer: Any, value: torch.Tensor) -> torch.Tensor:
        """The value every rank sees: the mean over ranks (one all-reduce; a NaN anywhere is a NaN everywhere)."""
        if self.world_size <= 1:
            return value
        return trainer.strategy.reduce(value.detach().float(), reduce_op="mean")

    def clear(self) -> None:
        """Forget every value not yet handed out (after a rollback they describe discarded weights)."""
        self._host.clear()
        self._unread = []
        self._accumulated = None


def _number(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value) if value.numel() == 1 else float(value.sum())
    return float(value)


def _scalar(value: Any, device: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.reshape(()) if value.numel() == 1 else value.sum()
    return torch.tensor(float(value), device=device)
