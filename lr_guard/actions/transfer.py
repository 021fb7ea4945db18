"""Move watched scalars to the host without synchronising the device.

Values are pushed in batches: ``push(steps, values)`` with one value per step (a 1-D tensor, or a Python list).
On CPU they are read at once. On an accelerator the batch is copied into a reused pinned host buffer with
``non_blocking=True`` -- one copy per batch, not per step -- and a CUDA event is recorded; the values are handed
out only once that event has completed (``event.query()`` never blocks), typically a step later. Decisions may
therefore lag, which a rollback to a confirmed-good snapshot makes harmless.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["HostScalars"]


class HostScalars:
    """A FIFO of ``(step, value)`` pairs whose values become floats once they are on the host (a "step" is any
    key: a step number, or a ``(step, signal)`` pair).

    ``fixed_lag=None`` hands a device batch out as soon as its copy has completed (no waiting ever). With
    ``fixed_lag=k`` a device batch is handed out exactly ``k`` pushes later -- waiting on its copy's event then, by
    which time it has long completed -- so that several processes act on the same step (DDP agreement).
    """

    def __init__(self, pool_size: int = 4, fixed_lag: int | None = None) -> None:
        self._ready: deque[tuple[Any, float]] = deque()
        self._in_flight: deque[tuple[list[Any], torch.Tensor, Any]] = deque()
        self._free: dict[int, list[torch.Tensor]] = {}  # pinned buffers by length, reused
        self._pool_size = pool_size
        self.fixed_lag = fixed_lag

    def push(self, steps: Sequence[Any], values: torch.Tensor | Sequence[float]) -> None:
        """Queue ``values[i]`` (one per step; a tensor is flattened to ``len(steps)`` values) for ``steps[i]``."""
        steps = list(steps)
        if not steps:
            return
        if not isinstance(values, torch.Tensor):
            self._ready.extend(zip(steps, (float(v) for v in values), strict=True))
            return
        values = values.detach().reshape(-1)
        if values.numel() != len(steps):
            raise ValueError(f"push: {len(steps)} steps but {values.numel()} values")
        if not values.is_cuda:
            self._ready.extend(zip(steps, values.tolist(), strict=True))
            return
        free = self._free.get(len(steps))
        buffer = free.pop() if free else torch.empty(len(steps), dtype=torch.float32, pin_memory=True)
        buffer.copy_(values, non_blocking=True)  # casts to float32 on the way
        event = torch.cuda.Event()
        event.record()
        self._in_flight.append((steps, buffer, event))

    def ready(self) -> list[tuple[Any, float]]:
        """Values that have arrived, oldest first; never waits for the device (except with ``fixed_lag``, on a
        copy ``fixed_lag`` pushes old)."""
        if self.fixed_lag is not None:
            while len(self._in_flight) > self.fixed_lag:
                self._in_flight[0][2].synchronize()
                self._release_first()
            return self._take_ready()
        while self._in_flight and self._in_flight[0][2].query():
            self._release_first()
        return self._take_ready()

    def _release_first(self) -> None:
        steps, buffer, _ = self._in_flight.popleft()
        self._ready.extend(zip(steps, buffer.tolist(), strict=True))  # a pinned host tensor: no device sync
        self._recycle(buffer)

    def _recycle(self, buffer: torch.Tensor) -> None:
        free = self._free.setdefault(buffer.numel(), [])
        if len(free) < self._pool_size:
            free.append(buffer)

    def _take_ready(self) -> list[tuple[Any, float]]:
        out = list(self._ready)
        self._ready.clear()
        return out

    def drain(self) -> list[tuple[Any, float]]:
        """Everything pushed so far, waiting for it if needed (for the end of training)."""
        for _, _, event in self._in_flight:
            event.synchronize()
        while self._in_flight:
            self._release_first()
        return self._take_ready()

    def clear(self) -> None:
        """Forget values not yet handed out (after a rollback they describe discarded weights)."""
        self._ready.clear()
        while self._in_flight:
            _, buffer, _ = self._in_flight.popleft()
            self._recycle(buffer)

    def __len__(self) -> int:
        return len(self._ready) + sum(len(steps) for steps, _, _ in self._in_flight)
