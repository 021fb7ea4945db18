"""OscillationDetector: the loss swinging up and down far beyond its noise, with no net progress."""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from lr_guard.detectors.base import Detector, LogOrLinear, NoiseScale, check_choice, check_number, to_float
from lr_guard.events import Event, EventKind

__all__ = ["OscillationDetector"]


class OscillationDetector(Detector):
    """Reports the signature of a learning rate that is too high: large swings with no net progress.

    Definition, over the last ``window`` values of ``y = log(loss)``:

    * the residuals ``r`` of ``y`` from its least-squares line (the local trend) have a robust spread
      ``swing = 1.4826 * MAD(r)``;
    * the reference noise ``s`` is the stream's long-run robust noise scale, ``0.886 * EMA(|dy|)`` (slow, clipped,
      and frozen while the swing ratio is above half the threshold so an oscillation cannot raise its own yardstick);
    * the loss **oscillates** when ``swing / s >= threshold`` (swings far beyond the noise), the residuals cross
      their median at least ``min_crossings`` times (up *and* down, repeatedly -- a single spike or a level shift
      does not qualify), and the net change of the line over the window is smaller than ``2 * swing``
      (no net progress: a scheduled LR drop or a fast fall is progress, not oscillation).

    Why this is calibrated: for stationary noise, ``MAD`` of the residuals and ``0.886 * E|dy|`` estimate the same
    sigma, so the ratio sits near 1 (below 1 for heavy-tailed noise) and a threshold of 3 is many standard errors
    away; a smoothly decaying loss is removed by the line. Sign-flip counts of ``dy`` are not used: white noise
    already flips 2/3 of the time (lag-1 autocorrelation -0.5).

    The window statistics are evaluated every ``stride`` values (O(window) each time, O(1) otherwise). After an
    event, ``window`` values pass before the next. Non-finite values are ignored.

    Args:
        window: Values in the analysed window (>= 10).
        threshold: Swing-to-noise ratio at which oscillation is reported.
        min_crossings: Median crossings of the residuals required in the window.
        stride: Evaluate the window every ``stride`` values.
        warmup_steps: Values to see before any event (at least ``window``).
        space: ``"log"`` (default) or ``"linear"``.
        name: Name used in events.

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
    _STATE_FIELDS = ("_n", "_n_nonfinite", "_recent", "_noise", "_prev", "_quiet_left", "_score")

    def __init__(
        self,
        window: int = 50,
        threshold: float = 3.0,
        min_crossings: int = 4,
        stride: int = 5,
        warmup_steps: int = 100,
        space: str = "log",
        name: str | None = None,
    ) -> None:
        check_number("window", window, low=10, integer=True)
        check_number("threshold", threshold, low=1.0, low_open=True)
        check_number("min_crossings", min_crossings, low=2, integer=True)
        check_number("stride", stride, low=1, integer=True)
        check_number("warmup_steps", warmup_steps, low=0, integer=True)
        check_choice("space", space, ("log", "linear"))
        self.window = window
        self.threshold = float(threshold)
        self.min_crossings = min_crossings
        self.stride = stride
        self.warmup_steps = warmup_steps
        self.space = space
        super().__init__(name)

    def _reset(self) -> None:
        self._to_y = LogOrLinear(self.space, self.name)
        x = np.arange(self.window, dtype=float)
        self._x = x - x.mean()
        self._x_ss = float(self._x @ self._x)
        self._n = 0
        self._n_nonfinite = 0
        self._recent: deque[float] = deque(maxlen=self.window)
        self._noise = NoiseScale(0.99, 2.0)
        self._prev = math.nan
        self._quiet_left = 0
        self._score = math.nan

    @property
    def score(self) -> float:
        """The last evaluated swing-to-noise ratio (NaN before the first full window)."""
        return self._score

    def update(self, value: float, step: int) -> Event | None:
        value = to_float(value)
        if not math.isfinite(value):
            self._n_nonfinite += 1
            return None
        y = self._to_y(value)
        if y is None:
            return None
        self._n += 1
        frozen = not math.isnan(self._score) and self._score >= 0.5 * self.threshold
        if self._n > 1 and not frozen:
            self._noise.update(abs(y - self._prev))
        self._prev = y
        self._recent.append(y)
        if self._quiet_left > 0:
            self._quiet_left -= 1
        if len(self._recent) < self.window or self._n % self.stride:
            return None
        ys = np.fromiter(self._recent, dtype=float, count=self.window)
        slope = float(self._x @ ys) / self._x_ss
        residuals = ys - ys.mean() - slope * self._x
        centred = residuals - np.median(residuals)
        swing = 1.4826 * float(np.median(np.abs(centred)))
        sigma = self._noise.sigma
        ratio = swing / sigma if sigma > 0.0 else (math.inf if swing > 0.0 else 0.0)
        self._score = ratio
        if ratio < self.threshold or self._quiet_left > 0 or self._n < max(self.warmup_steps, self.window):
            return None
        net = abs(slope) * (self.window - 1)
        if net >= 2.0 * swing:
            return None
        signs = centred > 0.0
        crossings = int(np.count_nonzero(signs[1:] != signs[:-1]))
        if crossings < self.min_crossings:
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
            f"swing {amplitude}, {crossings} reversals in {self.window} steps, no net progress)",
        )
