"""SpikeDetector: a sudden upward jump of the loss above its recent trend, in robust noise units."""

from __future__ import annotations

import math
from collections import deque

from lr_guard.detectors.base import Detector, LogOrLinear, NoiseScale, check_choice, check_number, to_float
from lr_guard.detectors.tails import rare_level
from lr_guard.events import Event, EventKind

__all__ = ["SpikeDetector"]


class SpikeDetector(Detector):
    """Flags a value that jumps far above the loss's recent trend.

    Works on ``y = log(loss)`` (``space="log"``), so a spike is a multiplicative jump and one threshold fits a
    loss of 0.1 as well as one of 30. The trend is a fast EMA of ``y`` (decay ``trend_alpha``, so it lags a falling
    loss by only ~``trend_alpha / (1 - trend_alpha)`` steps); the noise scale ``s`` is ``0.886 * EMA(|dy|)`` with the
    slower decay ``noise_alpha`` (first differences, so the loss's own fall does not inflate it). The score is
    ``z = (y - trend) / s``, in robust sigmas; an event is raised when ``z`` reaches the current threshold once
    ``warmup_steps`` values have been seen.

    Heavy tails: the current threshold is ``threshold`` or, if higher, the height this stream's own noise reaches
    about once in 100,000 values, read from the tail shape of the last ``tail_window`` scores
    (:func:`lr_guard.detectors.tails.rare_level`). On Gaussian noise that stays at ``threshold``; on Student-t(3)
    noise it is about 35 sigma, where its ordinary draws of 8-11 sigma no longer count as spikes. It is estimated
    from ``TAIL_MIN`` differences on (raised by ``1 + TAIL_DOUBT / sqrt(n)`` while few are known) and read again
    every ``TAIL_REFRESH``. Opt-in (``tail_window=2000``, say): the default ``0`` keeps ``threshold`` fixed, since
    the small labelled data spikes of real LM logs (8.5-9 sigma in the modded-nanogpt log) lie inside their own
    stream's tail and would no longer be flagged.

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
        tail_window: Recent first differences the tail shape is read from (0, the default: a fixed ``threshold``).
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
    _STATE_FIELDS = (
        "_n",
        "_n_nonfinite",
        "_trend",
        "_prev",
        "_noise",
        "_excursion",
        "_score",
        "_tail",
        "_tail_new",
        "_level",
        "_last_y",
    )
    TAIL_MIN = 20  # differences before the tail shape is first read (then at twice as many, ...)
    TAIL_REFRESH = 100  # differences between two readings at most
    TAIL_DOUBT = 2.0  # the level read from n differences is raised by a factor 1 + TAIL_DOUBT / sqrt(n)

    def __init__(
        self,
        threshold: float = 8.0,
        trend_alpha: float = 0.9,
        noise_alpha: float = 0.98,
        warmup_steps: int = 20,
        clip: float = 3.0,
        rebase_steps: int = 10,
        tail_window: int = 0,
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
        check_number("tail_window", tail_window, low=0, integer=True)
        if 0 < tail_window < self.TAIL_MIN:
            raise ValueError(
                f"tail_window must be 0 (a fixed threshold) or >= {self.TAIL_MIN} scores, got {tail_window!r}"
            )
        check_choice("space", space, ("log", "linear"))
        self.threshold = float(threshold)
        self.trend_alpha = float(trend_alpha)
        self.noise_alpha = float(noise_alpha)
        self.warmup_steps = int(warmup_steps)
        self.clip = float(clip)
        self.rebase_steps = int(rebase_steps)
        self.tail_window = int(tail_window)
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
        self._tail: deque[float] = deque(maxlen=max(1, self.tail_window))  # |dy| / sigma of recent values
        self._tail_new = 0  # differences taken in since the level was last read
        self._level = self.threshold  # the current threshold
        self._last_y = math.nan  # the last ordinary value (no excursion), NaN after an excursion

    @property
    def score(self) -> float:
        """The last value's score in robust sigmas (NaN until the noise scale is known)."""
        return self._score

    @property
    def quiet(self) -> bool:
        return not self._excursion

    @property
    def current_threshold(self) -> float:
        """The score a value needs now to be a spike: ``threshold``, or this stream's rarely reached noise level
        if that is higher (see the class docstring)."""
        return self._level

    @property
    def alarm_level(self) -> float:
        """The loss value that would score exactly ``threshold`` now (in the loss's own units; NaN until known)."""
        if self._n < 2 or self._noise.sigma <= 0.0:
            return math.nan
        return self._to_y.inverse(self._trend + self._level * self._noise.sigma)

    @property
    def trend(self) -> float:
        """The current trend, in the loss's own units."""
        return self._to_y.inverse(self._trend) if self._n else math.nan

    def diagnostics(self) -> dict[str, float]:
        return {"score": self._score, "threshold": self._level}

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

    def _take_difference(self, y: float, sigma: float) -> None:
        """Keep ``|dy| / sigma`` of an ordinary value after an ordinary one; read the tail shape when it is due."""
        last, self._last_y = self._last_y, y
        if last != last or sigma <= 0.0:  # NaN: the value before was not an ordinary one
            return
        self._tail.append(abs(y - last) / sigma)
        self._tail_new += 1
        n = len(self._tail)
        if n >= self.TAIL_MIN and (self._tail_new >= min(self.TAIL_REFRESH, n // 2) or n == self.TAIL_MIN):
            self._tail_new = 0
            rare = rare_level(self._tail) * (1.0 + self.TAIL_DOUBT / math.sqrt(n))  # fewer values, more doubt
            self._level = rare if rare > self.threshold else self.threshold

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
        level = self._level
        if self._excursion:
            self._last_y = math.nan
            self._excursion += 1
            if z < 0.5 * level:
                self._excursion = 0
            elif self._excursion > self.rebase_steps:
                self._excursion, self._trend, self._prev = 0, y, y
                self._n += 1
                return None
        elif self._n >= self.warmup_steps:
            if z >= level:
                self._excursion, self._last_y = 1, math.nan
                tails = "" if level == self.threshold else "; this stream's noise has heavy tails"
                event = Event(
                    EventKind.SPIKE,
                    step,
                    value,
                    z,
                    level,
                    self.name,
                    f"step {step}: loss {value:.4g} is {z:.1f} robust sigma above its trend "
                    f"{self._to_y.inverse(self._trend):.4g} (threshold {level:.3g}{tails})",
                    sudden=True,
                )
            elif self.tail_window:
                self._take_difference(y, sigma)
        y_clipped = min(y, self._trend + self.clip * sigma) if self._n >= self.warmup_steps else y
        self._noise.update(abs(y_clipped - self._prev))
        self._trend = self.trend_alpha * self._trend + (1.0 - self.trend_alpha) * y_clipped
        self._prev = y_clipped
        self._n += 1
        return event
