"""Move watched scalars to the host without synchronising the device.

On CPU a value is read at once. On an accelerator the tensor is copied into a reused pinned host buffer with
``non_blocking=True`` and a CUDA event is recorded; the value is handed out only once its event has completed
(``event.query()`` never blocks), typically one step later. Decisions may therefore lag a step, which a rollback
to a confirmed-good snapshot makes harmless.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

__all__ = ["HostScalars"]


class HostScalars:
    """A FIFO of ``(step, scalar tensor)`` whose values become ``(step, float)`` once they are on the host.

    ``fixed_lag=None`` hands a device value out as soon as its copy has completed (no waiting ever). With
    ``fixed_lag=k`` a device value is handed out exactly ``k`` pushes later -- waiting on its copy's event then, by
    which time it has long completed -- so that several processes act on the same step (DDP agreement).
    """

    def __init__(self, pool_size: int = 8, fixed_lag: int | None = None) -> None:
        self._ready: deque[tuple[int, float]] = deque()
        self._in_flight: deque[tuple[int, torch.Tensor, Any]] = deque()
        self._free: list[torch.Tensor] = []
        self._pool_size = pool_size
        self.fixed_lag = fixed_lag

    def push(self, step: int, value: torch.Tensor | float) -> None:
        if not isinstance(value, torch.Tensor):
            self._ready.append((step, float(value)))
            return
        if not value.is_cuda:
            self._ready.append((step, float(value) if value.numel() == 1 else float(value.float().sum())))
            return
        value = value.detach()
        buffer = self._free.pop() if self._free else torch.empty((), dtype=torch.float32, pin_memory=True)
        buffer.copy_(value.float().sum() if value.numel() != 1 else value.reshape(()), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._in_flight.append((step, buffer, event))

    def ready(self) -> list[tuple[int, float]]:
        """Values that have arrived, oldest first; never waits for the device (except with ``fixed_lag``, on a
        copy ``fixed_lag`` steps old)."""
        if self.fixed_lag is not None:
            while len(self._in_flight) > self.fixed_lag:
                self._in_flight[0][2].synchronize()
                self._release_first()
            return self._take_ready()
        while self._in_flight and self._in_flight[0][2].query():
            self._release_first()
        return self._take_ready()

    def _release_first(self) -> None:
        step, buffer, _ = self._in_flight.popleft()
        self._ready.append((step, float(buffer.item())))  # a pinned host tensor: no device sync
        if len(self._free) < self._pool_size:
            self._free.append(buffer)

    def _take_ready(self) -> list[tuple[int, float]]:
        out = list(self._ready)
        self._ready.clear()
        return out

    def drain(self) -> list[tuple[int, float]]:
        """Everything pushed so far, waiting for it if needed (for the end of training)."""
        for _, _, event in self._in_flight:
            event.synchronize()
        return self.ready()

    def clear(self) -> None:
        """Forget values not yet handed out (after a rollback they describe discarded weights)."""
        self._ready.clear()
        while self._in_flight:
            _, buffer, _ = self._in_flight.popleft()
            if len(self._free) < self._pool_size:
                self._free.append(buffer)

    def __len__(self) -> int:
        return len(self._ready) + len(self._in_flight)
