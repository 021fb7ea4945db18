"""The upward LR search's rules (pure Python; a part of :class:`~lr_guard.policy.GuardPolicy`): while the loss falls
steadily and quietly, try a higher LR for a short window from a snapshot; keep it if the loss then falls faster
than its trend before the trial said it would, roll back otherwise.

With ``window`` = ``lr_search_window`` optimizer steps:

* **Steady and quiet** (a trial may start): the last ``window`` values came with no event and at one LR factor
  (the values since the guard last changed the LR, or since the last event, whichever is later); every detector
  is quiet, no snapshot waits for confirmation, no rollback incident is open, no warm-up is under way (the
  schedule's own LR is not rising), and the schedule's own LR is at least ``DECAY_STOP`` (half) of its peak so
  far: the search stops in the decay. And the loss falls: over those values the least-squares slope of the log
  of the loss (of the loss itself where one is not positive) against ``log(step + 1)`` is below zero by more
  than ``Z`` (2) of its standard errors.
* **The trial**: the LR factor times ``lr_search_factor`` -- less where that would reach ``CEILING_MARGIN``
  (0.9) of the ceiling, and no trial where the raise would then be under ``MIN_RAISE`` (1.25) -- for ``window``
  steps, from a snapshot of the training state taken as it starts.
* **The verdict**, ``window`` steps on: the trend line fitted before the trial predicts each (log) loss of the
  trial's second half (its first half is the transient of the change). The trial is kept when the mean of actual minus
  predicted is below zero by more than ``Z`` standard errors of that mean (the trial values' scatter about the
  line, and the line's own uncertainty at that distance). Otherwise, or when a detector reports an event on a
  trial step, it is rolled back to the snapshot with the LR factor it had, and its LR becomes the ceiling. The
  snapshot is the good one from then on (a restore frees the others, the starting state's too: the loss was
  falling steadily before the trial, so no failed start is left to restart).
* **The ceiling** (the threshold already found): the lowest of the LR of a failed trial, the LR at which a
  divergence was rolled back (not a bad batch's) or a failed start restarted, and the LR before an LR cut. LRs
  are those of the first param group of the first optimizer, as the decisions report them.
* **Back-off**: after a failed trial the next waits ``window * 2**failures`` steps (failures in a row, at most
  ``MAX_BACKOFF`` doublings); after a kept one the trial's second half is the next baseline.

Before the trials, when ``lr_search_sweep_steps`` is not 0, **an LR range test inside the run** (:class:`Sweep`),
once per fit, from the state training starts from: for ``lr_search_sweep_steps`` optimizer steps the LR (of the
first param group; the others keep their ratio to it) grows exponentially from ``SWEEP_LOW`` (1/100) to
``SWEEP_HIGH`` (1000) times the peak the schedule will reach (with the guard's factor), and stops early once the
range test's divergence rule fires (:func:`~lr_guard.callbacks.range_sweep.sweep_divergence_detector`: 4x the
best loss for 3 values, 10x at once, or a non-finite loss). The sweep is read by
:func:`~lr_guard.range_test.read_sweep` (its convergence threshold and suggestion, unchanged), the run is rolled
back to where it started, and the LR factor is set to place the schedule's peak (:func:`placed_peak`): at the
suggestion when above it, at ``STEEPEST_FRACTION`` (half) of the steepest descent when below that. The threshold
is the ceiling from then on, and no trial follows a sweep that found one (the trials are the net of a sweep that
found none). Its steps are discarded, and counted with the failed trials' (``discarded_trial_steps``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lr_guard.config import GuardConfig
    from lr_guard.detectors import Detector
    from lr_guard.range_test import RangeTestResult

__all__ = ["LR_SEARCH", "LRSearch", "Sweep", "Trend", "Trial", "fit_trend", "sweep_lrs"]

LR_SEARCH = "lr_search"  # the kind (and detector name) of the search's events
Z = 2.0  # standard errors a slope or a gain must clear
MIN_RAISE = 1.25
CEILING_MARGIN = 0.9
DECAY_STOP = 0.5
MAX_BACKOFF = 5
COUNTS = ("lr_sweeps", "lr_trials", "lr_raises_kept", "lr_trials_rolled_back", "discarded_trial_steps")
SWEEP_LOW = 1e-2  # the sweep's first LR, times the schedule's peak
SWEEP_HIGH = 1e3  # its last


STEEPEST_FRACTION = 0.5  # a peak below this x the sweep's steepest descent is raised to it (see placed_peak)


def placed_peak(peak: float, result: RangeTestResult) -> tuple[float, str]:
    """Where the in-run sweep puts the schedule's ``peak``, and why: lowered to the range test's suggestion when
    above it, raised to ``STEEPEST_FRACTION`` x the steepest descent (no higher than the suggestion) when below
    that, else kept."""
    suggestion, steepest = result.suggestion, result.steepest
    if suggestion is not None and peak > suggestion:
        return suggestion, f"above the range test's suggestion {suggestion:.3g}: lowered to it"
    if steepest is not None:
        floor = STEEPEST_FRACTION * steepest
        if suggestion is not None:
            floor = min(floor, suggestion)
        if peak < floor:
            return floor, f"below the steepest descent's {floor:.3g}: raised to it"
    return peak, "between the steepest descent and the suggestion: kept"


def sweep_lrs(peak: float, steps: int) -> list[float]:
    """The LR of each step of an in-run sweep: ``SWEEP_LOW`` to ``SWEEP_HIGH`` times ``peak``, exponentially."""
    return [peak * SWEEP_LOW * (SWEEP_HIGH / SWEEP_LOW) ** (k / (steps - 1)) for k in range(steps)]


@dataclass(frozen=True)
class Trend:
    """A least-squares line ``y = intercept + slope * log(step + 1)`` over ``n`` values, ``y`` the log of the loss
    (a power law in the step, which slows down as loss curves do) or, where a loss is not positive, the loss."""

    log_loss: bool
    intercept: float
    slope: float
    scatter: float  # the residuals' standard deviation (n - 2 degrees of freedom)
    n: int
    x_mean: float
    sxx: float

    @property
    def slope_t(self) -> float:
        """The slope in standard errors (negative: falling)."""
        se = self.scatter / math.sqrt(self.sxx) if self.sxx > 0 else math.inf
        if se == 0:
            return -math.inf if self.slope < 0 else math.inf
        return self.slope / se

    def predict(self, step: int) -> float:
        return self.intercept + self.slope * math.log(step + 1)

    def y(self, loss: float) -> float:
        """A loss on the line's scale."""
        return math.log(loss) if self.log_loss else loss


def fit_trend(values: list[tuple[int, float]]) -> Trend | None:
    """The trend of ``(step, loss)`` values against log(step + 1); ``None`` for fewer than 3 distinct steps."""
    n = len(values)
    if n < 3:
        return None
    log_loss = all(loss > 0 for _, loss in values)
    xs = [math.log(step + 1) for step, _ in values]
    ys = [math.log(loss) if log_loss else loss for _, loss in values]
    x_mean, y_mean = sum(xs) / n, sum(ys) / n
    sxx = sum((x - x_mean) ** 2 for x in xs)
    if sxx <= 0:
        return None
    slope = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = y_mean - slope * x_mean
    ssr = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    return Trend(log_loss, intercept, slope, math.sqrt(ssr / (n - 2)), n, x_mean, sxx)


@dataclass
class Trial:
    """A trial under way: the LR raised by ``raise_factor`` from ``lr_before`` at the step ``start`` the snapshot
    holds (``None`` until it is taken); ``detectors``: their state after the last value before ``start``."""

    raise_factor: float
    lr_before: float
    trend: Trend
    baseline: list[tuple[int, float]]
    detectors: dict[str, Any]
    start: int | None = None
    values: list[tuple[int, float]] = field(default_factory=list)

    @property
    def lr(self) -> float:
        return self.lr_before * self.raise_factor


@dataclass
class Sweep:
    """The in-run range test under way: from the snapshot of step ``start``, step ``start + k`` runs at ``lrs[k]``
    (the first param group's LR); ``peak``: the LR the schedule's peak would have had without it; ``stop``: the
    divergence rule that ends it early."""

    start: int
    lrs: list[float]
    peak: float
    stop: Detector
    losses: list[float] = field(default_factory=list)
    stopped_at: int | None = None  # the sweep step at which the rule fired (or the loss was not finite)

    def add(self, step: int, loss: float) -> bool:
        """The loss of step ``step``; whether the sweep is over (all its steps seen, or stopped)."""
        k = step - self.start
        if k < len(self.losses) or k >= len(self.lrs):
            return False  # a value of a step before the sweep, or past its end (not read)
        self.losses.append(loss)
        if self.stop.update(loss, k) is not None or not math.isfinite(loss):
            self.stopped_at = k
        return self.stopped_at is not None or len(self.losses) == len(self.lrs)

    def read(self) -> RangeTestResult:
        """The range test's reading of the steps seen so far."""
        from lr_guard.range_test import read_sweep  # SciPy: only where a sweep runs (a replay starts without it)

        return read_sweep(self.lrs[: len(self.losses)], self.losses, self.stopped_at)

    def lr_at(self, step: int) -> float | None:
        """The LR of step ``step``; ``None`` outside the sweep."""
        k = step - self.start
        return self.lrs[k] if 0 <= k < len(self.lrs) else None


@dataclass(frozen=True)
class Verdict:
    """How a trial's second half compares with the trend before it."""

    keep: bool
    gain: float  # mean of actual minus predicted (log) loss (negative: it fell faster than the trend)
    se: float  # the standard error of ``gain``
    n: int


class LRSearch:
    """The search's state and its statistics; :class:`~lr_guard.policy.GuardPolicy` feeds it and acts.

    ``config``: the guard's settings, of which ``lr_search_factor`` (the raise of one trial) and
    ``lr_search_window`` (the steps of a trial, and of the baseline before it) are read here.
    """

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.reset()

    @property
    def window(self) -> int:
        return self.config.lr_search_window

    def reset(self) -> None:
        """A new fit: no ceiling, no history, no back-off."""
        self.ceiling = math.inf
        self.failures = 0
        self.next_at = 0
        self.peak = 0.0  # the schedule's own LR's peak so far
        self.scheduled = math.nan  # the schedule's own LR, and the effective one, as last noted
        self.lr = math.nan
        self.history: list[tuple[int, float]] = []  # the values since the last event or LR change
        self.trial: Trial | None = None
        self.sweep: Sweep | None = None
        self.swept = False  # this fit's sweep is done (kept across a resume: a resumed run does not sweep again)
        self.placed = False  # the sweep found a threshold and placed the peak: no trials (they are its net)

    def note_lr(self, scheduled: float, effective: float) -> None:
        self.scheduled, self.lr = scheduled, effective
        self.peak = max(self.peak, scheduled)

    def lower_ceiling(self, lr: float) -> None:
        if math.isfinite(lr) and lr > 0:
            self.ceiling = min(self.ceiling, lr)

    def add(self, step: int, loss: float) -> None:
        """A value with no event, at the current LR factor."""
        history = self.history
        history.append((step, loss))
        if len(history) > self.window:
            del history[0]

    def proposal(self, step: int) -> tuple[float, Trend] | None:
        """The raise to try now, and the trend it is judged against; ``None`` when the rules say not yet."""
        if self.placed or len(self.history) < self.window or step < self.next_at:
            return None
        if not self.scheduled >= DECAY_STOP * self.peak or not self.lr > 0:
            return None  # in the decay (or no LR noted)
        raise_factor = min(self.config.lr_search_factor, CEILING_MARGIN * self.ceiling / self.lr)
        if raise_factor < MIN_RAISE:
            return None
        trend = fit_trend(self.history)
        if trend is None or trend.slope_t >= -Z:
            return None
        return raise_factor, trend

    def verdict(self, trial: Trial) -> Verdict | None:
        """The trial's second half against the trend before it; ``None`` with fewer than 3 values there."""
        assert trial.start is not None
        half = trial.start + self.window // 2
        late = [(s, v) for s, v in trial.values if s >= half]
        n = len(late)
        if n < 3:
            return None
        trend = trial.trend
        if trend.log_loss and any(v <= 0 for _, v in late):
            return Verdict(False, math.inf, math.inf, n)  # a loss below zero on a log scale: not judged, not kept
        residuals = [trend.y(v) - trend.predict(s) for s, v in late]
        gain = sum(residuals) / n
        spread = math.sqrt(sum((r - gain) ** 2 for r in residuals) / (n - 1))
        x_mean = sum(math.log(s + 1) for s, _ in late) / n
        line = trend.scatter**2 * (1 / trend.n + (x_mean - trend.x_mean) ** 2 / trend.sxx)
        se = math.sqrt(spread**2 / n + line)
        return Verdict(gain < -Z * se, gain, se, n)

    def failed(self, at: int) -> None:
        """A trial failed (rolled back to step ``at``): its LR is the ceiling; back off."""
        assert self.trial is not None
        self.lower_ceiling(self.trial.lr)
        self.failures = min(self.failures + 1, MAX_BACKOFF)
        self._ended(at, self.window * 2**self.failures, self.trial.baseline)

    def kept(self, at: int) -> None:
        assert self.trial is not None and self.trial.start is not None
        self.failures = 0
        half = self.trial.start + self.window // 2
        self._ended(at, 0, [(s, v) for s, v in self.trial.values if s >= half])

    def abandoned(self, at: int) -> None:
        """A trial ended for another reason than its outcome (a checkpoint, an event before it began)."""
        assert self.trial is not None
        self._ended(at, self.window, self.trial.baseline)

    def _ended(self, at: int, wait: int, history: list[tuple[int, float]]) -> None:
        self.trial = None
        self.next_at = at + wait
        self.history = history[-self.window :]

    def state_dict(self) -> dict[str, Any]:
        """Between trials (a checkpoint ends a trial first): the ceiling, back-off and the values of the baseline."""
        return {
            "ceiling": self.ceiling,
            "failures": self.failures,
            "next_at": self.next_at,
            "peak": self.peak,
            "history": [list(v) for v in self.history],
            "swept": self.swept,
            "placed": self.placed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ceiling = float(state.get("ceiling", math.inf))
        self.failures = int(state.get("failures", 0))
        self.next_at = int(state.get("next_at", 0))
        self.peak = float(state.get("peak", 0.0))
        self.history = [(int(s), float(v)) for s, v in state.get("history", [])]
        self.swept = bool(state.get("swept", False))
        self.placed = bool(state.get("placed", False))
        self.trial = None
        self.sweep = None
