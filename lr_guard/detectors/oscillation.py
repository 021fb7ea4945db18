"""OscillationDetector: the loss swinging up and down far beyond its noise, with no net progress."""

from __future__ import annotations

import math
import operator
from collections import deque

from lr_guard.detectors.base import Detector, LogOrLinear, NoiseScale, check_choice, check_number, median, to_float
from lr_guard.events import Event, EventKind

__all__ = ["OscillationDetector"]


class OscillationDetector(Detector):
    """Reports the signature of a learning rate that is too high: large swings with no net progress.

    Definition, over the last ``window`` values of ``y = log(loss)``:

    * the residuals ``r`` of ``y`` from its least-squares line (the local trend) have a robust spread
      ``swing = 1.4826 * MAD(r)``;
    * the reference noise ``s`` is the stream's long-run robust noise scale, ``0.886 * EMA(|dy|)`` (slow; each
      ``|dy|`` clipped at twice its mean, so it can grow by at most ~1% per value; frozen while an oscillation is
      under way so that it cannot raise its own yardstick);
    * the residuals' structure is their largest autocorrelation in absolute value over lags ``1 .. window // 8``
      (a period-2 swing gives -1 at lag 1, period 4 gives -1 at lag 2, slow swings give values near +1; white noise
      gives about 0, with a standard error of ``1 / sqrt(window)``);
    * the loss **oscillates** when ``swing / s >= threshold`` (swings far beyond the noise), the structure is at
      least ``min_autocorrelation`` (it swings back and forth, rather than being noisier: a classifier's log-loss
      noise grows as its loss falls towards zero, and that is no oscillation), and the net change of the line over
      the window is smaller than ``2 * swing`` (no net progress: a scheduled drop or a fast fall is progress).

    Why this is calibrated: for stationary noise, ``MAD`` of the residuals and ``0.886 * E|dy|`` estimate the same
    sigma, so the ratio sits near 1 (below 1 for heavy-tailed noise) and the autocorrelations near 0; a smoothly
    decaying loss is removed by the line. Sign-flip counts of ``dy`` are not used: white noise already flips 2/3 of
    the time (lag-1 autocorrelation of ``dy`` is -0.5), which is why the test runs on residuals, not differences.

    The window statistics are evaluated every ``stride`` values (O(window) each time, O(1) otherwise). After an
    event, ``window`` values pass before the next. Non-finite values are ignored.

    Args:
        window: Values in the analysed window (>= 10).
        threshold: Swing-to-noise ratio at which oscillation is reported.
        min_autocorrelation: Structure (largest absolute autocorrelation of the residuals) required, in (0, 1).
        stride: Evaluate the window every ``stride`` values.
        warmup_steps: Values to see before any event (at least ``window``).
        space: ``"log"`` (default) or ``"linear"``.
        name: Name used in events.
        signal: The named signal the detector reads (``"loss"``: the watched loss or metric).

    Example:
        >>> import math, random
        >>> rng = random.Random(0)
        >>> calm = [2.0 * math.exp(rng.gauss(0.0, 0.02)) for t in range(150)]
        >>> swinging = [2.0 * math.exp(0.2 * math.sin(math.pi * t / 3) + rng.gauss(0.0, 0.02)) for t in range(100)]
        >>> det = OscillationDetector()
        >>> [e.step for t, x in enumerate(calm + swinging) if (e := det.update(x, t))]
        [189, 239]
    """

    kind = EventKind.OSCILLATION
    value_counts = ("stride", "warmup_steps")  # not the window: the line and autocorrelation fit need its values
    _STATE_FIELDS = ("_n", "_n_nonfinite", "_recent", "_noise", "_prev", "_quiet_left", "_score", "_oscillating")

    def __init__(
        self,
        window: int = 50,
        threshold: float = 3.0,
        min_autocorrelation: float = 0.5,
        stride: int = 10,
        warmup_steps: int = 100,
        space: str = "log",
        name: str | None = None,
        signal: str = "loss",
    ) -> None:
        check_number("window", window, low=10, integer=True)
        check_number("threshold", threshold, low=1.0, low_open=True)
        check_number("min_autocorrelation", min_autocorrelation, low=0.0, high=1.0, low_open=True, high_open=True)
        check_number("stride", stride, low=1, integer=True)
        check_number("warmup_steps", warmup_steps, low=0, integer=True)
        check_choice("space", space, ("log", "linear"))
        self.window = int(window)
        self.threshold = float(threshold)
        self.min_autocorrelation = float(min_autocorrelation)
        self.stride = int(stride)
        self.warmup_steps = int(warmup_steps)
        self.space = space
        super().__init__(name, signal)

    def _reset(self) -> None:
        self._to_y = LogOrLinear(self.space, self.name)
        centre = (self.window - 1) / 2.0
        self._x = [i - centre for i in range(self.window)]  # positions, centred: the line fit needs no intercept
        self._x_ss = sum(x * x for x in self._x)
        self._n = 0
        self._n_nonfinite = 0
        self._recent: deque[float] = deque(maxlen=self.window)
        self._noise = NoiseScale(0.99, 2.0)
        self._prev = math.nan
        self._max_lag = max(1, self.window // 8)
        self._quiet_left = 0
        self._score = math.nan
        self._oscillating = False

    @property
    def quiet(self) -> bool:
        return not self._oscillating

    @property
    def score(self) -> float:
        """The last evaluated swing-to-noise ratio (NaN before the first full window)."""
        return self._score

    def diagnostics(self) -> dict[str, float]:
        return {"score": self._score, "threshold": self.threshold}

    def charts(self) -> dict[str, list[str]]:
        return {"{slot} ratio vs threshold": ["{slot}/score", "{slot}/threshold"]}

    def _structure(self, centred: list[float]) -> tuple[float, int]:
        """Largest absolute autocorrelation of the residuals over lags 1..max_lag, and its lag (signed value)."""
        denom = sum(map(operator.mul, centred, centred))
        if denom <= 0.0:
            return 0.0, 0
        best, best_lag = 0.0, 0
        for lag in range(1, self._max_lag + 1):
            r = sum(map(operator.mul, centred[lag:], centred)) / denom  # map stops at the shorter: pairs t, t+lag
            if abs(r) > abs(best):
                best, best_lag = r, lag
        return abs(best), best_lag if best >= 0 else -best_lag

    def update(self, value: float, step: int) -> Event | None:
        if type(value) is not float:
            value = to_float(value)
        if not math.isfinite(value):
            self._n_nonfinite += 1
            return None
        y = self._to_y(value)
        if y is None:
            return None
        self._n += 1
        if self._n > 1 and not self._oscillating:
            self._noise.update(abs(y - self._prev))
        self._prev = y
        self._recent.append(y)
        if self._quiet_left > 0:
            self._quiet_left -= 1
        if len(self._recent) < self.window or self._n % self.stride:
            return None
        # plain Python: for a window of ~50 values it is several times faster than numpy's per-call overhead
        ys = self._recent
        x = self._x
        slope = sum(map(operator.mul, x, ys)) / self._x_ss
        mean = sum(ys) / self.window
        residuals = [y - mean - slope * xi for xi, y in zip(x, ys, strict=True)]
        middle = median(residuals)
        centred = [r - middle for r in residuals]
        swing = 1.4826 * median([abs(c) for c in centred])
        sigma = self._noise.sigma
        ratio = swing / sigma if sigma > 0.0 else (math.inf if swing > 0.0 else 0.0)
        self._score = ratio
        structure, lag = self._structure(centred) if ratio >= 0.5 * self.threshold else (0.0, 0)
        no_progress = abs(slope) * (self.window - 1) < 2.0 * swing
        self._oscillating = structure >= self.min_autocorrelation and no_progress
        if ratio < self.threshold or self._quiet_left > 0 or self._n < max(self.warmup_steps, self.window):
            return None
        if not self._oscillating:
            return None
        self._quiet_left = self.window
        unit = "x" if self._to_y.log else ""
        amplitude = f"{self._to_y.ratio(swing):.3g}{unit}" if self._to_y.log else f"+-{swing:.3g}"
        return Event(
            EventKind.OSCILLATION,
            step,
            value,
            ratio,
            self.threshold,
            self.name,
            f"step {step}: loss swings {ratio:.1f}x its noise level (threshold {self.threshold:g}; "
            f"swing {amplitude}, autocorrelation {structure:+.2f} at lag {lag}, "
            f"no net progress over {self.window} steps)",
        )
