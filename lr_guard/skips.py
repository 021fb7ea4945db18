"""Which optimizer updates were not applied, and how many are still to skip (pure Python; the policy's ledger)."""

from __future__ import annotations

import math

from lr_guard.detectors import SpikeDetector

__all__ = ["APPLIED", "CLIPPED", "GATE_REASONS", "GRAD_OUTLIER", "LOSS_OUTLIER", "NON_FINITE", "SKIPPED", "SkipLedger"]

# The update gate's verdict on a step (lr_guard.actions.gate), handed to the policy with the step's values
APPLIED, NON_FINITE, LOSS_OUTLIER, GRAD_OUTLIER, CLIPPED = 0, 1, 2, 3, 4
SKIPPED = (NON_FINITE, LOSS_OUTLIER, GRAD_OUTLIER)
GATE_REASONS = {
    NON_FINITE: "its loss or gradient is not finite",
    LOSS_OUTLIER: "its loss is an outlier",
    GRAD_OUTLIER: "its gradient norm is an outlier",
    CLIPPED: "its gradient norm is an outlier: the update was scaled down to the band's edge",
}


class SkipLedger:
    """The updates skipped before they were applied, by step, and the ``left`` still to skip after a rollback.

    Each skipped step records whether its skip was counted already (a skip after a rollback is counted when it is
    made; a skipped spike when its event arrives). Steps older than the value being observed are forgotten.
    """

    def __init__(self) -> None:
        self.left = 0  # kept across a resume (in the guard's state)
        self.reset_run()

    def reset_run(self) -> None:
        self.steps: dict[int, bool] = {}  # step whose update was not applied -> its skip was counted already

    def take(self, step: int) -> bool:
        """Skip the update of ``step`` if skips are left (recorded as counted); whether it is skipped."""
        if self.left <= 0:
            return False
        self.left -= 1
        self.steps[step] = True
        return True

    def mark(self, step: int) -> None:
        """The update of ``step`` was skipped for a reason its event will tell (not counted yet)."""
        self.steps[step] = False

    def spike(self, step: int, value: float, detector: SpikeDetector) -> bool:
        """Skip the update of ``step`` if its ``value`` is non-finite or would score as a spike now (marked, to be
        counted when its event arrives); whether it is skipped."""
        if math.isfinite(value) and not detector.peek(value) >= detector.current_threshold:
            return False
        self.mark(step)
        return True

    def observing(self, step: int) -> None:
        """The value of ``step`` is being observed: forget the skips of earlier steps."""
        if self.steps:
            self.steps = {s: c for s, c in self.steps.items() if s >= step}

    def __contains__(self, step: object) -> bool:
        return step in self.steps

    def claim(self, step: int) -> bool:
        """The event of a skipped ``step`` is dealt with; whether its skip was counted already."""
        return self.steps.pop(step)

    def done(self, step: int) -> None:
        """The value of ``step`` has been observed."""
        self.steps.pop(step, None)
