"""DivergenceDetector: non-finite values, a blow-up far above the best loss, or a significant sustained rise."""

from __future__ import annotations

import math
from collections import deque
from statistics import NormalDist

import numpy as np

from lr_guard.detectors.base import (
    Detector,
    LogOrLinear,
    NoiseScale,
    check_choice,
    check_number,
    median,
    to_float,
)
from lr_guard.events import Event, EventKind

__all__ = ["DivergenceDetector"]

# A value after a single-value blow-up that is this share of the way up or less, relative to the value before it
# (its excess over the best, log space), is on its way back: a bad batch recovering, not a model that stays broken
RECOVERING = 2.0 / 3.0


class DivergenceDetector(Detector):
    """Reports that training is diverging. Three rules, checked in this order:

    1. **Non-finite**: a NaN or +-inf value, at once (also during warm-up).
    2. **Blow-up**: one value above both the first values' level (the untrained loss) and ``instant_factor``
       times the best loss, also during warm-up: at once when it is also ``instant_factor`` times the untrained
       loss and the value before it was already well up (more than ``noise_sigmas`` robust sigmas above its
       level, or above the blow-up margin): a blow-up under way; otherwise once the next ``instant_confirm``
       values stay above the blow-up margin too, the last of them no less than ``RECOVERING`` (2/3) as far above
       the best as the one before it. A model the update has broken stays broken (or climbs), while a bad batch
       -- hard or mislabelled samples, a corrupt batch, an outlier of heavy-tailed noise, even at +7 nats -- is
       back, or on its way back, within a few values and is benign: holding back the update of one bad batch is
       the update gate's job. Its values then leave the running median below. Or the smoothed loss (median of the last
       ``smoothing_window`` values) above ``factor`` times the best for ``patience`` consecutive values. "The best"
       is the minimum over time of a steady level (an EMA of ``y`` with a 10-value memory), not of the reactive
       median: the minimum of a noisy series is set by its luckiest stretch, and a noisy classifier's loss would
       otherwise look "2x its best" without having risen at all. In log
       space "``factor`` times" is a margin of ``log(factor)``, widened to ``noise_sigmas`` robust sigmas where
       the per-step noise is that large (losses near zero), so lucky low batches cannot make noise look like 2x.
    3. **Sustained rise** (checked every ``trend_window // 10`` values): over the last ``trend_window`` values a
       one-sided Mann-Kendall test finds an upward
       trend at level ``significance``, and the median of the window's last tenth exceeds that of its first tenth
       by at least the blow-up margin scaled by ``min_rise`` (a relative rise, 0.2 = 20%). Mann-Kendall is
       rank-based, so heavy-tailed batch noise and single spikes do not make a flat loss look like a rise, and a
       stable non-zero loss (no trend) never counts.

    After an event the detector stays quiet until the smoothed loss is back within ``min_rise`` of its best and the
    raw loss within the blow-up margin (a rollback restores the detector's own state, so it never waits there), so one
    divergence gives one event, however many NaNs follow. Values <= 0 are skipped in log space.

    Args:
        factor: Blow-up factor over the best level (> 1).
        instant_factor: Factor over the best level for a single value to count as a blow-up (>= ``factor``).
        instant_confirm: Values after such a value (unless a rise was already under way) that must stay above
            the blow-up margin (``factor`` times the best) before it counts; ``0`` counts every blow-up at once.
            One that falls back within the margin, or (the last) falls back by more than a third of the way to
            the best from the value before it, dismisses it.
        smoothing_window: Values in the running median.
        patience: Consecutive smoothed values above the margin needed for a blow-up.
        trend_window: Values in the sustained-rise test (0 switches the rule off).
        significance: One-sided p-value below which the Mann-Kendall trend counts.
        min_rise: Relative rise over the trend window that a sustained rise must reach.
        noise_sigmas: Floor of the margins in robust noise sigmas.
        warmup_steps: Values to see before the smoothed and trend rules are armed.
        space: ``"log"`` (default) or ``"linear"``.
        name: Name used in events.
        signal: The named signal the detector reads (``"loss"``: the watched loss or metric).
        far_at_once: ``True``: a blow-up also ``instant_factor`` times the untrained level counts at once, rise
            under way or not (the gradient-norm watch of the update gate: a gradient that far above the untrained
            one has been applied, whatever the next values say).

    Example:
        >>> det = DivergenceDetector()
        >>> stream = [1.0 / (1 + 0.05 * t) for t in range(40)] + [float("nan")] * 3
        >>> [(e.step, e.score) for t, x in enumerate(stream) if (e := det.update(x, t))]
        [(40, inf)]
    """

    kind = EventKind.DIVERGENCE
    value_counts = ("instant_confirm", "smoothing_window", "patience", "trend_window", "warmup_steps")
    _STATE_FIELDS = (
        "_n",
        "_n_nonfinite",
        "_recent",
        "_trend",
        "_trend_steps",
        "_start",
        "_best",
        "_level",
        "_above",
        "_noise",
        "_prev",
        "_latched",
        "_over_best",
        "_outlier",
        "_outlier_excess",
        "_rise",
    )

    def __init__(
        self,
        factor: float = 2.0,
        instant_factor: float = 10.0,
        instant_confirm: int = 2,
        smoothing_window: int = 5,
        patience: int = 2,
        trend_window: int = 100,
        significance: float = 1e-4,
        min_rise: float = 0.2,
        noise_sigmas: float = 3.0,
        warmup_steps: int = 10,
        space: str = "log",
        name: str | None = None,
        signal: str = "loss",
        far_at_once: bool = False,
    ) -> None:
        if not isinstance(far_at_once, bool):
            raise TypeError(f"far_at_once must be True or False, got {far_at_once!r}")
        check_number("factor", factor, low=1.0, low_open=True)
        check_number("instant_factor", instant_factor, low=float(factor))
        check_number("instant_confirm", instant_confirm, low=0, integer=True)
        check_number("smoothing_window", smoothing_window, low=1, integer=True)
        check_number("patience", patience, low=1, integer=True)
        check_number("trend_window", trend_window, low=0, integer=True)
        if 0 < trend_window < 10:
            raise ValueError(f"trend_window must be 0 (off) or >= 10, got {trend_window!r}")
        check_number("significance", significance, low=0.0, high=0.5, low_open=True, high_open=True)
        check_number("min_rise", min_rise, low=0.0, low_open=True)
        check_number("noise_sigmas", noise_sigmas, low=0.0)
        check_number("warmup_steps", warmup_steps, low=0, integer=True)
        check_choice("space", space, ("log", "linear"))
        self.factor = float(factor)
        self.instant_factor = float(instant_factor)
        self.instant_confirm = int(instant_confirm)
        self.smoothing_window = int(smoothing_window)
        self.patience = int(patience)
        self.trend_window = int(trend_window)
        self.significance = float(significance)
        self.min_rise = float(min_rise)
        self.noise_sigmas = float(noise_sigmas)
        self.warmup_steps = int(warmup_steps)
        self.space = space
        self.far_at_once = far_at_once
        super().__init__(name, signal)

    def _reset(self) -> None:
        self._to_y = LogOrLinear(self.space, self.name)
        self._z_crit = NormalDist().inv_cdf(1.0 - self.significance)  # stdlib: a replay imports no scipy
        self._log_factor = math.log(self.factor)
        self._log_instant = math.log(self.instant_factor)
        self._log_rise = math.log1p(self.min_rise)
        self._tenth = max(1, self.trend_window // 10)
        self._n = 0
        self._n_nonfinite = 0
        self._recent: deque[float] = deque(maxlen=self.smoothing_window)
        self._trend: deque[float] = deque(maxlen=max(self.trend_window, 1))
        self._trend_steps: deque[int] = deque(maxlen=max(self.trend_window, 1))  # the step of each of them
        self._start = math.nan  # the first value: the untrained loss
        self._best = math.inf
        self._level = math.nan  # EMA(0.9) of y: the steady level whose minimum is "the best"
        self._above = 0
        self._noise = NoiseScale(0.98, 3.0)
        self._prev = math.nan
        self._latched = False
        self._over_best = math.nan  # smoothed y minus the best level; the score is its ratio (log space)
        # a single-value blow-up waiting for confirmation: (its step, its value, values still to see) or None
        self._outlier: tuple[int, float, int] | None = None
        self._outlier_excess = math.nan  # how far above the best the latest value after it was (log space)
        self._rise = 0.0  # how far the last value was above the level before it: a rise already under way

    @property
    def quiet(self) -> bool:
        """No alarm latched and the smoothed loss within the blow-up margin of the best."""
        return (
            not self._latched and self._above == 0 and self._outlier is None and not self._over_best > self._log_factor
        )

    @property
    def waiting(self) -> tuple[int, float] | None:
        """The step and value of a single-value blow-up waiting for the values after it to confirm it, or ``None``."""
        return None if self._outlier is None else (self._outlier[0], self._outlier[1])

    @property
    def score(self) -> float:
        """Smoothed loss over its best, as a ratio (log space) or a difference (linear space)."""
        return self._to_y.ratio(self._over_best)

    def diagnostics(self) -> dict[str, float]:
        return {"score": self.score, "threshold": self.factor}

    def charts(self) -> dict[str, list[str]]:
        return {"{slot}: loss over its best vs factor": ["{slot}/score", "{slot}/threshold"]}

    def _event(
        self,
        step: int,
        value: float,
        score: float,
        threshold: float,
        text: str,
        sudden: bool = False,
        began: int | None = None,
    ) -> Event:
        self._latched = True
        self._outlier = None
        return Event(
            EventKind.DIVERGENCE, step, value, score, threshold, self.name, f"step {step}: {text}", sudden, began
        )

    def rearm(self) -> None:
        """Unlatch: the next non-finite value or blow-up raises a new event (see :meth:`Detector.rearm`)."""
        self._latched = False

    def update(self, value: float, step: int) -> Event | None:
        if type(value) is not float:
            value = to_float(value)
        if not math.isfinite(value):
            self._n_nonfinite += 1
            if self._latched:
                return None
            return self._event(step, value, math.inf, math.inf, f"loss is {value} (non-finite)", sudden=True)
        to_y = self._to_y
        y = to_y(value)
        if y is None:
            return None
        n = self._n = self._n + 1
        noise = self._noise
        prev, rise = self._prev, self._rise  # the value before this one, and how far it rose above its level
        if n > 1:
            noise.update(abs(y - self._prev))
            self._rise = y - self._level
            level = self._level = 0.9 * self._level + 0.1 * y
        else:  # the untrained loss: the first value, before any update could have blown it up
            self._start = level = self._level = y
        self._prev = y
        recent = self._recent
        recent.append(y)
        smoothed = median(recent) if len(recent) > 1 else y
        margin = self.noise_sigmas * noise.sigma
        if margin < self._log_factor:
            margin = self._log_factor
        best = self._best
        over_best = self._over_best = smoothed - best

        if self._latched:
            if over_best < min(margin, self._log_rise) and y - best < margin:
                self._latched = False
            else:
                return None

        outlier = self._outlier
        if outlier is not None:  # a blow-up waiting for the values after it
            excess, before = y - best, self._outlier_excess
            if excess <= margin or excess < RECOVERING * before:  # back within the margin, or on its way back
                self._dismiss(outlier)  # a benign outlier
                smoothed = median(recent) if len(recent) > 1 else y
                over_best = self._over_best = smoothed - best
            elif outlier[2] <= 1:
                self._outlier = None
                return self._blow_up(step, value, excess, outlier[0], outlier[1])
            else:
                self._outlier = (outlier[0], outlier[1], outlier[2] - 1)
                self._outlier_excess = excess
                return None
        elif y - best > max(self._log_instant, margin) and y > self._start:
            # at once when there is no confirmation to wait for, or when the value is far above the untrained loss
            # and the one before it was already well above its level: a blow-up under way, not one bad batch
            rising = rise > self.noise_sigmas * noise.sigma or prev - best > margin
            if not self.instant_confirm or ((rising or self.far_at_once) and y - self._start > self._log_instant):
                return self._blow_up(step, value, y - best)
            self._outlier = (step, value, self.instant_confirm)
            self._outlier_excess = math.nan
            return None
        armed = n >= self.warmup_steps
        if armed and over_best > margin:
            self._above += 1
            if self._above >= self.patience:
                self._above = 0
                return self._smoothed_rise(step, value, smoothed)
        else:
            self._above = 0
        if level < best:
            self._best = level
        if self.trend_window:
            trend = self._trend
            trend.append(y)
            self._trend_steps.append(step)
            if armed and n % self._tenth == 0 and len(trend) == self.trend_window:
                return self._sustained_rise(step, value, margin)
        return None

    def _dismiss(self, outlier: tuple[int, float, int]) -> None:
        """Drop a benign outlier: its value and the ones after it that stayed up leave the running median, which
        they would otherwise lift for a few values (a bad batch of several steps is not a smoothed rise)."""
        self._outlier = None
        recent, kept = self._recent, self._recent.pop()  # the value that dismissed it stays
        for _ in range(min(len(recent), 1 + self.instant_confirm - outlier[2])):
            recent.pop()
        recent.append(kept)

    def _blow_up(
        self, step: int, value: float, ratio: float, first_step: int | None = None, first_value: float = math.nan
    ) -> Event:
        to_y = self._to_y
        since = ""
        if first_step is not None:
            since = f" (from {first_value:.4g} at step {first_step}: it stayed up for {step - first_step} more steps)"
        return self._event(
            step,
            value,
            to_y.ratio(ratio),
            self.instant_factor,
            f"loss {value:.4g} blew up to {self._ratio_text(ratio)} its best level "
            f"{to_y.inverse(self._best):.4g}, above its starting level{since}",
            sudden=True,
            began=first_step,
        )

    def _smoothed_rise(self, step: int, value: float, smoothed: float) -> Event:
        to_y = self._to_y
        return self._event(
            step,
            value,
            self.score,
            self.factor,
            f"smoothed loss {to_y.inverse(smoothed):.4g} is {self._ratio_text(self._over_best)} its best "
            f"{to_y.inverse(self._best):.4g} for {self.patience} steps (threshold {self.factor:g}x)",
        )

    def _ratio_text(self, log_ratio: float) -> str:
        if self._to_y.log:
            return f"{self._to_y.ratio(log_ratio):.3g}x"
        return f"{log_ratio:+.3g} above"

    def _sustained_rise(self, step: int, value: float, margin: float) -> Event | None:
        values = list(self._trend)
        k = self._tenth
        rise = median(values[-k:]) - median(values[:k])
        if rise < max(self._log_rise, margin * self._log_rise / self._log_factor):
            return None  # cheap gate: most steps end here
        n = len(values)
        ys = np.asarray(values)
        # Mann-Kendall S: the sum over pairs i < j of sign(y_j - y_i), in C (a Python double loop is ~0.5 ms)
        s = int(np.triu(np.sign(ys[None, :] - ys[:, None]), 1).sum())
        z = (s - 1) / math.sqrt(n * (n - 1) * (2 * n + 5) / 18.0)
        if z < self._z_crit:
            return None
        steps = list(self._trend_steps)
        # the rise began at the window's lowest value (unknown for a window restored from an older checkpoint)
        began = steps[int(np.argmin(ys))] if len(steps) == n else None
        self._trend.clear()
        self._trend_steps.clear()
        return self._event(
            step,
            value,
            z,
            self._z_crit,
            f"loss rose {self._ratio_text(rise)} over the last {n} steps "
            f"(Mann-Kendall z {z:.1f} > {self._z_crit:.1f}, p < {self.significance:g})",
            began=began if began is not None and began < step else None,
        )
