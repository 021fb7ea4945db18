"""SpikeDetector: a sudden upward jump of the loss above its recent trend, in robust noise units."""

from __future__ import annotations

import math

from lr_guard.detectors.base import Detector, LogOrLinear, NoiseScale, check_choice, check_number, to_float
from lr_guard.events import Event, EventKind

__all__ = ["SpikeDetector"]


class SpikeDetector(Detector):
    """Flags a value that jumps far above the loss's recent trend.

    Works on ``y = log(loss)`` (``space="log"``), so a spike is a multiplicative jump and one threshold fits a
    loss of 0.1 as well as one of 30. The trend is a fast EMA of ``y`` (decay ``trend_alpha``, so it lags a falling
    loss by only ~``trend_alpha / (1 - trend_alpha)`` steps); the noise scale ``s`` is ``0.886 * EMA(|dy|)`` with the
    slower decay ``noise_alpha`` (first differences, so the loss's own fall does not inflate it). The score is
    ``z = (y - trend) / s``, in robust sigmas; an event is raised when ``z >= threshold`` once ``warmup_steps``
    values have been seen.

    Robustness: values enter the trend clipped at ``trend + clip * s`` and ``|dy|`` enters the noise scale clipped
    at ``clip`` times its mean, so a spike cannot drag up the baseline it is measured against. The trend follows
    drops freely, so a scheduled LR drop or the loss's normal fall never scores high. One event is raised per
    excursion: the detector re-arms once ``z`` falls below ``threshold / 2``; if the loss stays up for
    ``rebase_steps`` values the new level becomes the trend (the rise is then the divergence detector's business).

    Non-finite values and, in log space, values <= 0 are ignored.

    Args:
        threshold: Score (robust sigmas above the trend) at which a spike is reported.
        trend_alpha: EMA decay of the trend, in (0, 1).
        noise_alpha: EMA decay of the noise scale, in (0, 1).
        warmup_steps: Number of values to see before any event can be raised.
        clip: Clipping of the statistics' inputs, in robust sigmas (> 1).
        rebase_steps: Values an excursion may last before its level is taken as the new trend.
        space: ``"log"`` (default) or ``"linear"``.
        name: Name used in events; defaults to the class name.
        signal: The named signal the detector reads (``"loss"``: the watched loss or metric).

    Example:
        >>> det = SpikeDetector(warmup_steps=20)
        >>> losses = [2.0 * 0.99 ** t * (1.0 + 0.01 * (-1) ** t) for t in range(60)]
        >>> losses[45] *= 1.5
        >>> [event.step for t, x in enumerate(losses) if (event := det.update(x, t))]
        [45]
    """

    kind = EventKind.SPIKE
    value_counts = ("warmup_steps", "rebase_steps")
    value_decays = ("trend_alpha", "noise_alpha")
    _STATE_FIELDS = ("_n", "_n_nonfinite", "_trend", "_prev", "_noise", "_excursion", "_score")

    def __init__(
        self,
        threshold: float = 8.0,
        trend_alpha: float = 0.9,
        noise_alpha: float = 0.98,
        warmup_steps: int = 20,
        clip: float = 3.0,
        rebase_steps: int = 10,
        space: str = "log",
        name: str | None = None,
        signal: str = "loss",
    ) -> None:
        check_number("threshold", threshold, low=0.0, low_open=True)
        check_number("trend_alpha", trend_alpha, low=0.0, high=1.0, low_open=True, high_open=True)
        check_number("noise_alpha", noise_alpha, low=0.0, high=1.0, low_open=True, high_open=True)
        check_number("warmup_steps", warmup_steps, low=2, integer=True)
        check_number("clip", clip, low=1.0, low_open=True)
        check_number("rebase_steps", rebase_steps, low=1, integer=True)
        check_choice("space", space, ("log", "linear"))
        self.threshold = float(threshold)
        self.trend_alpha = float(trend_alpha)
        self.noise_alpha = float(noise_alpha)
        self.warmup_steps = int(warmup_steps)
        self.clip = float(clip)
        self.rebase_steps = int(rebase_steps)
        self.space = space
        super().__init__(name, signal)

    def _reset(self) -> None:
        self._to_y = LogOrLinear(self.space, self.name)
        self._n = 0
        self._n_nonfinite = 0
        self._trend = 0.0
        self._prev = 0.0
        self._noise = NoiseScale(self.noise_alpha, self.clip)
        self._excursion = 0  # values seen since the current excursion began; 0 when none
        self._score = math.nan

    @property
    def score(self) -> float:
        """The last value's score in robust sigmas (NaN until the noise scale is known)."""
        return self._score

    @property
    def quiet(self) -> bool:
        return not self._excursion

    @property
    def alarm_level(self) -> float:
        """The loss value that would score exactly ``threshold`` now (in the loss's own units; NaN until known)."""
        if self._n < 2 or self._noise.sigma <= 0.0:
            return math.nan
        return self._to_y.inverse(self._trend + self.threshold * self._noise.sigma)

    @property
    def trend(self) -> float:
        """The current trend, in the loss's own units."""
        return self._to_y.inverse(self._trend) if self._n else math.nan

    def diagnostics(self) -> dict[str, float]:
        return {"score": self._score, "threshold": self.threshold}

    def signal_diagnostics(self) -> dict[str, float]:
        return {"trend": self.trend, "spike_level": self.alarm_level}

    def charts(self) -> dict[str, list[str]]:
        return {
            "{signal}, its trend and the spike alarm level": ["{signal}/raw", "{signal}/trend", "{signal}/spike_level"],
            "{signal} trend, with the band up to the spike alarm level": [
                "Margin",
                "{signal}/trend",
                "{signal}/trend",
                "{signal}/spike_level",
            ],
            "{slot} score vs threshold": ["{slot}/score", "{slot}/threshold"],
        }

    def peek(self, value: float) -> float:
        """The score ``value`` would get now, without taking it in (NaN while warming up or for non-finite
        values; ``inf`` for a value the log space cannot place). Lets a caller act *before* an update."""
        value = to_float(value)
        if not math.isfinite(value) or self._n < self.warmup_steps or self._excursion:
            return math.nan
        if self._to_y.log and value <= 0.0:
            return math.nan
        y = math.log(value) if self._to_y.log else value
        sigma = self._noise.sigma
        return (y - self._trend) / sigma if sigma > 0.0 else (math.inf if y > self._trend else 0.0)

    def update(self, value: float, step: int) -> Event | None:
        if type(value) is not float:
            value = to_float(value)
        if not math.isfinite(value):
            self._n_nonfinite += 1
            return None
        y = self._to_y(value)
        if y is None:
            return None
        if self._n == 0:
            self._n, self._trend, self._prev = 1, y, y
            return None
        sigma = self._noise.sigma
        z = (y - self._trend) / sigma if sigma > 0.0 else (math.inf if y > self._trend else 0.0)
        self._score = z
        event = None
        if self._excursion:
            self._excursion += 1
            if z < 0.5 * self.threshold:
                self._excursion = 0
            elif self._excursion > self.rebase_steps:
                self._excursion, self._trend, self._prev = 0, y, y
                self._n += 1
                return None
        elif z >= self.threshold and self._n >= self.warmup_steps:
            self._excursion = 1
            event = Event(
                EventKind.SPIKE,
                step,
                value,
                z,
                self.threshold,
                self.name,
                f"step {step}: loss {value:.4g} is {z:.1f} robust sigma above its trend "
                f"{self._to_y.inverse(self._trend):.4g} (threshold {self.threshold:g})",
                sudden=True,
            )
        y_clipped = min(y, self._trend + self.clip * sigma) if self._n >= self.warmup_steps else y
        self._noise.update(abs(y_clipped - self._prev))
        self._trend = self.trend_alpha * self._trend + (1.0 - self.trend_alpha) * y_clipped
        self._prev = y_clipped
        self._n += 1
        return event
