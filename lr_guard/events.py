"""What detectors report: one immutable :class:`Event` per finding."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Action", "Decision", "Event", "EventKind", "kind_name"]


class EventKind(str, enum.Enum):
    """The four built-in kinds of trouble, each with its response in the guard's policy. An event's ``kind`` is
    any string: a detector of a new kind is counted and logged under its own name. Members compare equal to their
    strings (``EventKind.SPIKE == "spike"``)."""

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
        kind: What was found: an :class:`EventKind` member or a detector's own kind (a string).
        step: The step (or update index) at which it was found.
        value: The monitored value at that step, as it was fed (not transformed).
        score: The detector's statistic at that step, in the units named by ``message``
            (robust sigmas for spikes, a noise ratio for oscillation, ...).
        threshold: The value ``score`` was compared with.
        detector: Name of the detector that raised it.
        message: One sentence a person can read in a log.
        sudden: Raised by one value alone (a spike, a non-finite value, a blow-up), not by a trend over
            several values.
        began: The step of the value that set it off, where the values after it confirmed it (a blow-up that
            stayed up), where a sustained rise began (the lowest value of its window), or where a plateau's
            progress stopped (the step of the best level it ever saw, before any rise); ``None``: ``step`` itself.
    """

    kind: str
    step: int
    value: float
    score: float
    threshold: float
    detector: str
    message: str
    sudden: bool = False
    began: int | None = None

    def __str__(self) -> str:
        return self.message


class Action(str, enum.Enum):
    """What the guard did about an event."""

    NONE = "none"  # logged only
    LR_CUT = "lr_cut"
    ROLLBACK = "rollback"
    STOP = "stop"
    SKIP = "skip"  # the offending update was not applied
    CLIP = "clip"  # the offending update was scaled down (the update gate's "clip" mode)
    HELD = "held"  # an action was due but held back (warm-up, cooldown, switched off)
    LR_TRIAL = "lr_trial"  # the LR search raised the LR for a trial, from a snapshot
    LR_KEEP = "lr_keep"  # the LR search kept a trial's raise (a failed trial is a rollback)
    LR_UNDO = "lr_undo"  # the LR search took a trial's raise back without a restore (an event before the trial)
    LR_SWEEP = "lr_sweep"  # the LR search began a range test inside the run, from the starting snapshot

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Decision:
    """An event and what the guard did about it, as one readable record.

    Attributes:
        event: What was seen.
        action: What was done.
        step: The step at which it was done.
        lr_before: The first param group's LR before (of the first optimizer).
        lr_after: Its LR after.
        rollback_to: The step restored by a rollback (else ``None``).
        skip_batches: Updates that will be skipped after a rollback.
        checkpoint: Path of the checkpoint written when stopping (else ``None``).
        message: The full sentence for the log.
        lr_factor: The factor the action applied to the LR (1.0 when it changed none).
        reason: Why an action was held, skipped or only logged ("" otherwise).
        epoch, batch_idx: Where the event's step was trained (the epoch and the batch index in it), where known:
            a skipped update's batch can be found again.
        dry_run: Nothing was done (``dry_run=True``): ``action`` is what the guard would have done, and the LRs
            are those the guard would have had.
        lr_cap: A rollback that capped the LR (``warmup_cap_factor``): the first param group's cap (else ``None``).
        trouble_lr: Its LR at the step the trouble began (``event.step`` of the incident's first event), where
            the cap was set; ``trouble_step``: that step.
    """

    event: Event
    action: Action
    step: int
    lr_before: float
    lr_after: float
    rollback_to: int | None = None
    skip_batches: int = 0
    checkpoint: str | None = None
    message: str = ""
    lr_factor: float = 1.0
    reason: str = ""
    epoch: int | None = None
    batch_idx: int | None = None
    dry_run: bool = False
    lr_cap: float | None = None
    trouble_lr: float | None = None
    trouble_step: int | None = None

    def __str__(self) -> str:
        return self.message


def kind_name(kind: str) -> str:
    """An event kind as a plain string (``EventKind.SPIKE`` -> ``"spike"``): the key of its counter and its tag."""
    return kind.value if isinstance(kind, enum.Enum) else str(kind)
