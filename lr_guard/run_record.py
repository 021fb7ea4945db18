"""A run's watched values and learning rate, kept in bounded memory for its picture (:mod:`lr_guard.plot`).

Values are kept one per step until ``capacity`` are held; from then on neighbouring entries are merged in pairs
each time the record fills up, so a run of any length takes at most ``capacity`` entries. Each entry keeps the
mean, the lowest and the highest finite value of its steps (a one-step spike stays visible in the range), how
many values were not finite, and the last learning rate.

>>> record = RunRecord(capacity=4)
>>> for step in range(10):
...     record.add(step, float(step), lr=0.1)
>>> record.stride, record.steps
(4, [0, 4, 8])
>>> record.means, record.lows, record.highs
([1.5, 5.5, 8.5], [0.0, 4.0, 8.0], [3.0, 7.0, 9.0])
"""

from __future__ import annotations

import math

__all__ = ["RunRecord"]

_STEP, _SUM, _FINITE, _LOW, _HIGH, _NON_FINITE, _LR = range(7)


class RunRecord:
    """The watched values and the LR of a run, decimated to at most ``capacity`` entries.

    Args:
        capacity: The most entries kept (at least 2). 2048 keeps every step of a 2,000-step run and one entry per
            64 steps of a 100k-step run: about 100 KB either way.
    """

    def __init__(self, capacity: int = 2048) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 2:
            raise ValueError(f"capacity must be an integer >= 2, got {capacity!r}")
        self.capacity = capacity
        self.clear()

    def clear(self) -> None:
        self.stride = 1  # steps' values per entry
        self._entries: list[list[float]] = []
        self._filled = 0  # values in the last entry

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, step: int, value: float, lr: float = math.nan) -> None:
        """The value watched at ``step`` (steps in increasing order) and the LR it trained with."""
        entries = self._entries
        if not entries or self._filled >= self.stride:
            if len(entries) >= self.capacity:
                self._halve()
                entries = self._entries
            entries.append([step, 0.0, 0, math.inf, -math.inf, 0, lr])
            self._filled = 0
        entry = entries[-1]
        self._filled += 1
        entry[_LR] = lr
        if math.isfinite(value):
            entry[_SUM] += value
            entry[_FINITE] += 1
            entry[_LOW] = min(entry[_LOW], value)
            entry[_HIGH] = max(entry[_HIGH], value)
        else:
            entry[_NON_FINITE] += 1

    def _halve(self) -> None:
        """Merge neighbouring entries in pairs (the record is full, so every entry holds ``stride`` values)."""
        old = self._entries
        merged = []
        for i in range(0, len(old) - 1, 2):
            a, b = old[i], old[i + 1]
            merged.append(
                [
                    a[_STEP],
                    a[_SUM] + b[_SUM],
                    a[_FINITE] + b[_FINITE],
                    min(a[_LOW], b[_LOW]),
                    max(a[_HIGH], b[_HIGH]),
                    a[_NON_FINITE] + b[_NON_FINITE],
                    b[_LR],
                ]
            )
        odd = len(old) % 2 == 1
        if odd:
            merged.append(old[-1])
        self._entries = merged
        self._filled = self.stride if odd else 2 * self.stride
        self.stride *= 2

    @property
    def steps(self) -> list[int]:
        """The first step of each entry."""
        return [int(e[_STEP]) for e in self._entries]

    @property
    def means(self) -> list[float]:
        """Each entry's mean of its finite values (NaN where none was finite)."""
        return [e[_SUM] / e[_FINITE] if e[_FINITE] else math.nan for e in self._entries]

    @property
    def lows(self) -> list[float]:
        return [e[_LOW] if e[_FINITE] else math.nan for e in self._entries]

    @property
    def highs(self) -> list[float]:
        return [e[_HIGH] if e[_FINITE] else math.nan for e in self._entries]

    @property
    def non_finite(self) -> list[int]:
        """How many of each entry's values were NaN or infinite."""
        return [int(e[_NON_FINITE]) for e in self._entries]

    @property
    def lrs(self) -> list[float]:
        """The LR of each entry's last step (NaN where it is not known)."""
        return [e[_LR] for e in self._entries]
