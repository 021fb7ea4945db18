"""SpikeDetector: a sudden upward jump of the loss above its recent trend, in robust noise units."""

from __future__ import annotations

import math
from collections import deque

from lr_guard.detectors.base import Detector, LogOrLinear, NoiseScale, check_choice, check_number, to_float
from lr_guard.detectors.tails import rare_height
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

    Heavy tails (on by default): the current threshold is ``threshold`` or, if higher, the height this stream's own
    noise reaches about once in 33,000 values, read from the *lower* tail of the last ``tail_window`` scores
    (:func:`lr_guard.detectors.tails.rare_height`). Real loss outliers go up only (bad batches), so upward data
    spikes never touch the side the noise is read from, while symmetric heavy-tailed noise shows there how far it
    reaches. On Gaussian noise, and on real LM logs whose lower tail is light, it stays at ``threshold``; on
    Student-t(3) noise it is about 30 sigma, where that noise's ordinary draws of 8-11 sigma no longer count as
    spikes. The scores are kept less their centre (an EMA of the clipped scores, decay ``CENTRE_ALPHA``, below 0
    while the trend lags a falling loss), and the threshold rides on that centre. Scores kept while the centre is
    off by more than ``SETTLED`` (a run's fast first fall) are left out once ``SETTLED_MIN`` others are known. The
    shape is read from ``TAIL_MIN`` scores on, then again every ``TAIL_REFRESH`` scores, or every
    ``TAIL_REFRESH_SHARE`` of the pool once it is larger; until it is first read, the threshold is at its cap (a
    stream's first few dozen values say nothing of how far its noise reaches). A height read from ``n`` scores is
    raised by a factor ``1 + TAIL_DOUBT / n``, at most ``TAIL_DOUBT_MAX`` (x3 up to 100 scores, x1.2 from 1,000,
    x1.1 from 2,000): the far tail read from a few hundred values is often a factor 2 off either way, and a
    threshold read low fires on noise.
    The threshold rises to at most ``TAIL_CAP`` times ``threshold``. ``tail_window=0`` keeps ``threshold`` fixed.

    Robustness: values enter the trend clipped at ``trend + clip * s`` and ``|dy|`` enters the noise scale clipped
    at ``clip`` times its mean, so a spike cannot drag up the baseline it is measured against. The trend follows
    drops freely, so a scheduled LR drop or the loss's normal fall never scores high. One event is raised per
    excursion: the detector re-arms once ``z`` falls below ``threshold / 2`` (``threshold`` itself, not the raised
    one, so a loss that stays up is rebased, as below, rather than flagged again and again); if the loss stays up for
    ``rebase_steps`` values the new level becomes the trend (the rise is then the divergence detector's business).

    Non-finite values and, in log space, values <= 0 are ignored.

    Args:
        threshold: Score (robust sigmas above the trend) at which a spike is reported.
        trend_alpha: EMA decay of the trend, in (0, 1).
        noise_alpha: EMA decay of the noise scale, in (0, 1).
        warmup_steps: Number of values to see before any event can be raised.
        clip: Clipping of the statistics' inputs, in robust sigmas (> 1).
        rebase_steps: Values an excursion may last before its level is taken as the new trend.
        tail_window: Recent scores the noise's tail shape is read from (0: a fixed ``threshold``).
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
        "_scores",
        "_early_scores",
        "_tail_new",
        "_tail_due",
        "_level",
        "_rare",
        "_centre",
    )
    TAIL_MIN = 20  # scores before the tail shape is first read
    TAIL_INTAKE = NoiseScale.MIN_COUNT  # values after which scores are kept (the noise scale is known by then)
    TAIL_REFRESH = 100  # scores between two readings of the shape: at most this (half the pool while it is smaller) ...
    TAIL_REFRESH_SHARE = 0.1  # ... or this share of the pool, if more
    TAIL_MIN_SPREAD = 0.4  # scores whose lower quartile lies closer to their median (robust sigmas) are not noise
    TAIL_DOUBT = 200.0  # the height read from n scores is raised by a factor 1 + TAIL_DOUBT / n ...
    TAIL_DOUBT_MAX = 3.0  # ... or at most this
    # The threshold rises to at most this many times ``threshold`` (64 sigma by default; Student-t(3) noise needs
    # about 45). A higher reading is not noise: it comes from a trend the detector lags (a smooth per-epoch curve,
    # a run's fast first fall), and would leave the detector blind (6,600 on the ResNet-110 per-epoch log).
    TAIL_CAP = 8.0
    CENTRE_ALPHA = 0.9  # EMA decay of the scores' centre (clipped scores; negative while the trend lags a fall)
    SETTLED = 0.5  # a score counts as settled while the centre is within +-SETTLED of 0 ...
    SETTLED_MIN = 400  # ... and once this many are kept, the unsettled ones (a run's fast first fall) are left out

    def __init__(
        self,
        threshold: float = 8.0,
        trend_alpha: float = 0.9,
        noise_alpha: float = 0.98,
        warmup_steps: int = 20,
        clip: float = 3.0,
        rebase_steps: int = 10,
        tail_window: int = 2000,
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
        window = max(1, self.tail_window)
        self._scores: deque[float] = deque(maxlen=window)  # settled scores of recent ordinary values, less the centre
        self._early_scores: deque[float] = deque(maxlen=window)  # the unsettled ones
        self._tail_new = 0  # scores kept since the shape was last read
        self._tail_due = self.TAIL_MIN  # scores to keep before it is read (again)
        # the current threshold: at its cap until the tail is first read (``threshold`` when it is never read)
        self._level = self.TAIL_CAP * self.threshold if self.tail_window else self.threshold
        self._rare = math.nan  # the noise's rare height above the scores' centre, from their lower tail (NaN: unread)
        self._centre = 0.0  # the scores' centre now (below 0 while the trend lags a falling loss)

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

    def _take_score(self, z: float) -> None:
        """Keep the score of an ordinary value, less the scores' centre; read the tail shape when it is due."""
        centre = self._centre
        if -self.SETTLED < centre < self.SETTLED:
            self._scores.append(z - centre)
        else:
            self._early_scores.append(z - centre)
        self._tail_new += 1
        if self._tail_new >= self._tail_due:
            self._read_tail()
        c = self.clip
        alpha = self.CENTRE_ALPHA
        self._centre = centre = alpha * centre + (1.0 - alpha) * (c if z > c else -c if z < -c else z)
        level = centre + self._rare  # NaN until the shape is first read: then the cap
        cap = self.TAIL_CAP * self.threshold
        self._level = cap if level != level else min(level, cap) if level > self.threshold else self.threshold

    def _read_tail(self) -> None:
        """Read the noise's rare height off the kept scores, and when to read it next."""
        pool = self._scores if len(self._scores) >= self.SETTLED_MIN else (*self._scores, *self._early_scores)
        n = len(pool)
        if n >= self.TAIL_MIN:
            rare = rare_height(sorted(pool), self.TAIL_MIN_SPREAD)
            if rare != rare:  # scores that hardly vary have no tail to read: ``threshold`` holds
                rare = 0.0
            self._rare = rare * min(1.0 + self.TAIL_DOUBT / n, self.TAIL_DOUBT_MAX)  # fewer values, more doubt
            self._tail_new = 0
        share = n * self.TAIL_REFRESH_SHARE
        self._tail_due = max(1, min(self.TAIL_REFRESH, n // 2) if share < self.TAIL_REFRESH else int(share))

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
            self._excursion += 1
            if z < 0.5 * self.threshold:
                self._excursion = 0
            elif self._excursion > self.rebase_steps:
                self._excursion, self._trend, self._prev = 0, y, y
                self._n += 1
                return None
        elif self._n >= self.warmup_steps:
            if z >= level:
                self._excursion = 1
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
            elif self.tail_window and sigma > 0.0:
                self._take_score(z)
        elif self.tail_window and self._n >= self.TAIL_INTAKE and sigma > 0.0:
            self._take_score(z)
        y_clipped = min(y, self._trend + self.clip * sigma) if self._n >= self.warmup_steps else y
        self._noise.update(abs(y_clipped - self._prev))
        self._trend = self.trend_alpha * self._trend + (1.0 - self.trend_alpha) * y_clipped
        self._prev = y_clipped
        self._n += 1
        return event
