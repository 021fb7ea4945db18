"""What detectors report: one immutable :class:`Event` per finding."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Event", "EventKind"]


class EventKind(str, enum.Enum):
    """The four kinds of trouble lr_guard watches for."""

    SPIKE = "spike"
    OSCILLATION = "oscillation"
    PLATEAU = "plateau"
    DIVERGENCE = "divergence"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Event:
    """A detector's finding at one step.

    Attributes:
        kind: What was found.
        step: The step (or update index) at which it was found.
        value: The monitored value at that step, as it was fed (not transformed).
        score: The detector's statistic at that step, in the units named by ``message``
            (robust sigmas for spikes, a noise ratio for oscillation, ...).
        threshold: The value ``score`` was compared with.
        detector: Name of the detector that raised it.
        message: One sentence a person can read in a log.
    """

    kind: EventKind
    step: int
    value: float
    score: float
    threshold: float
    detector: str
    message: str

    def __str__(self) -> str:
        return self.message
