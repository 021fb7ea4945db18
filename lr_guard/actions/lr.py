"""Learning-rate cuts that persist whatever LR scheduler the user runs: every LR change the guard makes goes here.

The problem: ``group["lr"] *= 0.5`` is undone by the next ``scheduler.step()`` of every closed-form scheduler
(``LambdaLR``, ``OneCycleLR``, ``CosineAnnealingWarmRestarts``...), and chainable schedulers would carry it
through ``eta_min`` arithmetic. The solution here: each param group carries a cumulative factor
(``group["lr_guard_factor"]``); every scheduler is made to *see and produce the unscaled schedule* -- its
``step`` is wrapped so that the groups hold the unscaled LR while it runs -- and the optimizer always steps with

    effective_lr = max(min(unscaled_lr * factor, cap), min(unscaled_lr, min_lr))

so a cut by ``f`` at step ``k`` makes the LR at every later step ``f`` times what the schedule alone gives, never
pushes it below ``min_lr`` (the schedule itself may go lower) and never above the schedule. ``cap``
(``group["lr_guard_cap"]``, none until the guard sets one: :func:`set_lr_caps`) is a ceiling on that LR: a warm-up
that carried the LR past where training stays stable rises to the cap and stays there until the schedule's own
decay passes under it. A cut scales the cap with the factor, so it bites also where the cap holds the LR. The
factor and the cap live in the param group, hence in ``optimizer.state_dict()``, and survive a checkpoint resume
(and a rollback restores neither: the guard carries them over); the scheduler's own
``state_dict`` is untouched (the wrapping swaps the instance's class for a subclass, adding no attribute).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "LRChange",
    "compose_with_scheduler",
    "cut_lr",
    "lr_caps",
    "lr_factors",
    "release_scheduler",
    "set_lr_caps",
    "set_lr_factors",
    "set_min_lr",
    "set_scheduled_lr",
    "take_up_written_lrs",
]


class HasParamGroups(Protocol):
    """An optimizer, or anything with its ``param_groups`` (a replay's optimizer on paper)."""

    param_groups: list[dict[str, Any]]


FACTOR = "lr_guard_factor"
UNSCALED = "lr_guard_unscaled"
EFFECTIVE = "lr_guard_effective"
MIN_LR = "lr_guard_min_lr"
CAP = "lr_guard_cap"


@dataclass(frozen=True)
class LRChange:
    """One param group's LR before and after a cut."""

    optimizer: int
    group: int
    old: float
    new: float


def _unscaled(group: dict[str, Any]) -> float:
    """The LR the user's schedule alone gives for this group now."""
    lr = float(group["lr"])
    if FACTOR not in group:
        return lr
    if group.get(EFFECTIVE) == lr:
        return float(group[UNSCALED])
    return lr  # someone else (the user, a tuner) wrote the LR: take it as the schedule's new value


def _apply(group: dict[str, Any], unscaled: float) -> None:
    factor = float(group.get(FACTOR, 1.0))
    min_lr = float(group.get(MIN_LR, 0.0))
    effective = max(min(unscaled * factor, float(group.get(CAP, math.inf))), min(unscaled, min_lr))
    group[UNSCALED] = unscaled
    group[EFFECTIVE] = effective
    group["lr"] = effective


def set_min_lr(optimizer: HasParamGroups, min_lr: float | Sequence[float]) -> None:
    """Record the floor below which cuts may not take each group's LR (one value, or one per group)."""
    groups = optimizer.param_groups
    floors = [float(min_lr)] * len(groups) if isinstance(min_lr, (int, float)) else [float(m) for m in min_lr]
    if len(floors) != len(groups):
        raise ValueError(
            f"min_lr has {len(floors)} values but the optimizer has {len(groups)} param groups; "
            "give one value, or one per param group"
        )
    for group, floor in zip(groups, floors, strict=True):
        group[MIN_LR] = floor


def set_scheduled_lr(optimizer: Any, lrs: Sequence[float]) -> None:
    """Write the schedule's own LR of each param group, the guard's factor and floor applied (for a run that has
    no scheduler object to wrap, e.g. a replay following a logged LR)."""
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        _apply(group, float(lr))


def cut_lr(optimizers: Iterable[HasParamGroups], factor: float, eps: float = 1e-8) -> list[LRChange]:
    """Multiply every group's cumulative LR factor (and its cap, where it has one) by ``factor`` (0 < factor < 1),
    honouring ``min_lr``.

    As torch's ``ReduceLROnPlateau``: a group whose LR would change by ``eps`` or less is left alone. Returns the
    changes actually made.
    """
    if not 0.0 < factor < 1.0:
        raise ValueError(f"factor must be in (0, 1), got {factor!r}")
    changes = []
    for i, optimizer in enumerate(optimizers):
        for j, group in enumerate(optimizer.param_groups):
            old = float(group["lr"])
            unscaled = _unscaled(group)
            previous, cap = float(group.get(FACTOR, 1.0)), group.get(CAP)
            group[FACTOR] = previous * factor
            if cap is not None:
                group[CAP] = cap * factor
            _apply(group, unscaled)
            if old - group["lr"] <= eps:
                group[FACTOR] = previous
                if cap is not None:
                    group[CAP] = cap
                _apply(group, unscaled)
                continue
            changes.append(LRChange(i, j, old, float(group["lr"])))
    return changes


def take_up_written_lrs(optimizer: HasParamGroups) -> list[LRChange]:
    """Apply the guard's factor and floor to an LR someone else wrote into a group since the guard last set it (a
    manual warm-up in ``optimizer_step``: ``pg["lr"] = scale * base_lr``), taking the written value as the
    schedule's own; returns the groups whose LR that changed (``old``: the value written; ``optimizer`` is 0)."""
    changes = []
    for j, group in enumerate(optimizer.param_groups):
        if FACTOR in group and group.get(EFFECTIVE) != group["lr"]:
            written = float(group["lr"])
            _apply(group, written)
            if group["lr"] != written:
                changes.append(LRChange(0, j, written, float(group["lr"])))
    return changes


def set_lr_factors(optimizers: Iterable[HasParamGroups], factors: Sequence[Sequence[float]]) -> None:
    """Set every group's cumulative factor (as returned by :func:`lr_factors`) and its effective LR."""
    for optimizer, group_factors in zip(optimizers, factors, strict=True):
        for group, factor in zip(optimizer.param_groups, group_factors, strict=True):
            unscaled = _unscaled(group)
            group[FACTOR] = float(factor)
            _apply(group, unscaled)


def set_lr_caps(optimizers: Iterable[HasParamGroups], caps: Sequence[Sequence[float]]) -> None:
    """Set every group's ceiling on its LR (as returned by :func:`lr_caps`; ``inf``: none) and its effective LR."""
    for optimizer, group_caps in zip(optimizers, caps, strict=True):
        for group, cap in zip(optimizer.param_groups, group_caps, strict=True):
            unscaled = _unscaled(group)
            group.setdefault(FACTOR, 1.0)  # the schedulers' steps re-apply the guard's LR state to this group
            if math.isinf(cap):
                group.pop(CAP, None)
            else:
                group[CAP] = float(cap)
            _apply(group, unscaled)


def lr_caps(optimizers: Iterable[HasParamGroups]) -> list[list[float]]:
    """The ceiling on the LR of every param group of every optimizer (``inf`` where the guard set none)."""
    return [[float(g.get(CAP, math.inf)) for g in opt.param_groups] for opt in optimizers]


def lr_factors(optimizers: Iterable[HasParamGroups]) -> list[list[float]]:
    """The cumulative factor of every param group of every optimizer (1.0 where no cut was made)."""
    return [[float(g.get(FACTOR, 1.0)) for g in opt.param_groups] for opt in optimizers]


def _scaled_step(self: Any, *args: Any, **kwargs: Any) -> Any:
    groups = self.optimizer.param_groups
    for group in groups:
        group["lr"] = _unscaled(group)
    try:
        step: Any = _original_class(self).step  # type: ignore[attr-defined]
        return step(self, *args, **kwargs)
    finally:
        for group in groups:
            if FACTOR in group:
                _apply(group, float(group["lr"]))


_SUBCLASSES: dict[type, type] = {}


def _original_class(scheduler: Any) -> type:
    cls = type(scheduler)
    return cls.__bases__[0] if getattr(cls, "_lr_guard_composed", False) else cls


def _reduce_composed(self: Any, protocol: int) -> Any:
    """Pickle (and deep-copy) a composed scheduler as its own class, composed again when loaded: pickle finds a
    class by its name, and the composing subclass carries the name of the class it composes."""
    composed, original = type(self), _original_class(self)
    reduce_ex: Any = original.__reduce_ex__
    rebuild, arguments, *rest = reduce_ex(self, protocol)
    arguments = tuple(original if a is composed else a for a in arguments)
    return (_rebuild_composed, (rebuild, arguments), *rest)


def _rebuild_composed(rebuild: Any, arguments: tuple[Any, ...]) -> Any:
    scheduler = rebuild(*arguments)  # its state is set after this returns
    scheduler.__class__ = _composed_class(type(scheduler))
    return scheduler


def _composed_class(cls: type) -> type:
    """The subclass of ``cls`` whose ``step()`` runs on the unscaled schedule (one per class)."""
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        sub = type(
            cls.__name__,
            (cls,),
            {
                "step": _scaled_step,
                "__reduce_ex__": _reduce_composed,
                "_lr_guard_composed": True,
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
            },
        )
        _SUBCLASSES[cls] = sub
    return sub


def compose_with_scheduler(scheduler: Any) -> None:
    """Make ``scheduler`` run on the unscaled schedule, so the guard's cuts compose with it. Idempotent."""
    cls = type(scheduler)
    if getattr(cls, "_lr_guard_composed", False):
        return
    if not hasattr(scheduler, "optimizer") or not callable(getattr(scheduler, "step", None)):
        raise TypeError(f"{cls.__name__} is not an LR scheduler (it needs .optimizer and .step())")
    scheduler.__class__ = _composed_class(cls)


def release_scheduler(scheduler: Any) -> None:
    """Undo :func:`compose_with_scheduler` (the factors stay in the param groups)."""
    if getattr(type(scheduler), "_lr_guard_composed", False):
        scheduler.__class__ = _original_class(scheduler)
