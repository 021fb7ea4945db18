"""What the guard's policy says about single updates (pure Python; a part of :class:`~lr_guard.policy.GuardPolicy`):
which to skip before they are applied, the update gate's verdicts, and the gradient norm's warnings.

* The ``skip_batches`` after a rollback are skipped and counted; with ``skip_spikes`` a step whose loss would
  score as a spike is skipped, and counted when its event arrives.

* A step whose update the gate skipped is recorded as a skip with the gate's reason, and its values are not fed
  to the detectors: they describe a batch, not the model. A clipped step is recorded, and fed as usual.
* A divergence of the gradient norm is a warning: the gradient norm leads the loss. A spike of the loss within
  ``GRAD_CONFIRM_STEPS`` steps confirms it, and is rolled back at once, before the loss's own rules would fire.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from lr_guard.detectors import SpikeDetector
from lr_guard.events import Action, Event, EventKind, kind_name
from lr_guard.skips import CLIPPED, GATE_REASONS, NON_FINITE, SkipLedger

if TYPE_CHECKING:
    from lr_guard.policy import Intent

__all__ = ["GRAD_CONFIRM_STEPS", "GRAD_NORM", "UpdateResponses"]

GRAD_NORM = "grad_norm"  # the global gradient norm of each step (measured by the update gate)
LOSS = "loss"
GRAD_CONFIRM_STEPS = 10
GRAD_WARNING = f"a warning: a loss spike within {GRAD_CONFIRM_STEPS} steps confirms it as a divergence"


class UpdateResponses:
    """The policy's answers about single updates (mixed into ``GuardPolicy``)."""

    counts: dict[str, int]
    config: Any
    detectors: dict[str, Any]
    skips: SkipLedger
    _grad_warning: int | None
    _signal_of: dict[str, str]
    _on_divergence: Callable[[Event, int], Intent]

    def _intent(self, *args: Any, **kwargs: Any) -> Intent:
        from lr_guard.policy import Intent

        return Intent(*args, **kwargs)

    @property
    def skip_left(self) -> int:
        """Updates still to skip after a rollback."""
        return self.skips.left

    def take_skip(self, step: int) -> bool:
        """Should the update of ``step`` be skipped (one of the ``skip_batches`` after a rollback)? Counts it."""
        if not self.skips.take(step):
            return False
        self.counts["skipped_batches"] += 1
        return True

    def should_skip(self, step: int, read_value: Callable[[], float] | None = None) -> bool:
        """Should the update of optimizer step ``step`` be skipped, before it is applied? One of the
        ``skip_batches`` after a rollback (counted now), or with ``skip_spikes`` a step whose value
        (``read_value()``, read only then) is non-finite or scores as a spike (counted when its event arrives)."""
        if self.take_skip(step):
            return True
        spike = self.detectors.get("spike")
        if not self.config.skip_spikes or read_value is None or not isinstance(spike, SpikeDetector):
            return False
        return self.skips.spike(step, read_value(), spike)

    def _warn(self, event: Event, calm_before: int) -> Intent:
        """A blow-up of the gradient norm: a warning, unless the loss of the same update (or of one at most
        ``GRAD_CONFIRM_STEPS`` steps before it) blew up too and waits for confirmation. Then that update, with its
        huge gradient, was applied: the model is hit even if the next losses look normal, and it is rolled back."""
        for detector in self.detectors.values():
            waiting = getattr(detector, "waiting", None) if self._signal_of.get(detector.name) == LOSS else None
            if waiting is not None and 0 <= event.step - waiting[0] <= GRAD_CONFIRM_STEPS:
                loss_step, loss = waiting
                confirmed = Event(
                    EventKind.DIVERGENCE,
                    event.step,
                    loss,
                    event.score,
                    event.threshold,
                    detector.name,
                    f"step {event.step}: loss {loss:.4g} at step {loss_step} blew up with the gradient norm of its "
                    f"update ({event.value:.4g}, {event.score:.3g}x its best level): the update was applied",
                    sudden=True,
                    began=loss_step,
                )
                intent = self._on_divergence(confirmed, calm_before)
                if intent.action != Action.ROLLBACK:
                    return intent
                why = f"the gradient-norm divergence of step {event.step} confirms the loss's blow-up"
                return replace(intent, reason=f"{why}; {intent.reason}" if intent.reason else why)
        self._grad_warning = event.step
        return self._intent(event, Action.NONE, reason=GRAD_WARNING)

    def _gated(self, step: int, values: Mapping[str, float], code: int) -> Intent:
        """The update gate skipped (or clipped) the update of ``step`` before it was applied."""
        loss, norm = values.get(LOSS, math.nan), values.get(GRAD_NORM, math.nan)
        kind = EventKind.DIVERGENCE if code == NON_FINITE else EventKind.SPIKE
        reason = GATE_REASONS.get(code, f"gate verdict {code}")
        event = Event(
            kind,
            step,
            loss,
            norm,
            math.nan,
            "gate",
            f"step {step}: loss {loss:.4g}, gradient norm {norm:.4g}: {reason}",
            sudden=True,
        )
        self.counts[kind_name(kind)] += 1
        if code == CLIPPED:
            return self._intent(event, Action.CLIP, reason="the update was scaled down before it was applied")
        self.counts["skipped_batches"] += 1
        return self._intent(event, Action.SKIP, reason="its update was not applied")

    def _on_spike(self, event: Event, calm_before: int) -> Intent:
        """A spike is logged, unless it is the loss confirming a gradient-norm divergence of the last
        ``GRAD_CONFIRM_STEPS`` steps: then it is a divergence, rolled back at once."""
        warned = self._grad_warning
        if warned is None or event.step - warned > GRAD_CONFIRM_STEPS or self._signal_of.get(event.detector) != LOSS:
            return self._intent(event, Action.NONE, reason="logged")
        self._grad_warning = None
        intent = self._on_divergence(event, calm_before)
        if intent.action != Action.ROLLBACK:
            return intent
        why = f"the loss confirms the gradient-norm divergence of step {warned}"
        return replace(intent, reason=f"{why}; {intent.reason}" if intent.reason else why)
