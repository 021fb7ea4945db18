"""PlateauDetector: no statistically meaningful improvement of a smoothed metric for ``patience`` updates."""

from __future__ import annotations

import math
from collections import deque

from lr_guard.detectors.base import Detector, NoiseScale, check_choice, check_number, to_float
from lr_guard.events import Event, EventKind

__all__ = ["PlateauDetector"]


class PlateauDetector(Detector):
    """Reports that a metric has stopped improving, with torch's ``ReduceLROnPlateau`` rules made noise-aware.

    The compared quantity is the mean of the last ``window`` values, not the raw value: per-batch losses are
    noisy, and torch's "best so far" applied per step is set by one lucky batch and then never beaten. An update
    counts as an improvement when this mean beats the best mean by more than both

    * torch's margin: ``threshold`` (``threshold_mode="rel"``: relative to ``|best|``; ``"abs"``: absolute), and
    * the noise of the estimate: ``noise_sigmas * s / sqrt(window)``, with ``s`` the robust per-value noise scale
      ``0.886 * EMA(|dx|)`` from first differences.

    After more than ``patience`` updates without improvement an event is raised, and ``cooldown`` updates follow
    during which bad updates are not counted -- the same state machine as torch, so the parameters mean the same.
    This is a "best-mean" rule rather than a trend test because it answers the question users ask ("has the loss
    improved meaningfully in the last N steps?") with torch's well-known parameters, costs O(1) per update, and the
    noise margin removes the lucky-batch bias a trend test was meant to address.

    For one value per epoch or per validation run, use ``window=1, noise_sigmas=0`` (exactly torch's rule) or a
    small window. Values are used as they are (no log), so ``mode="max"`` fits accuracies. Non-finite values are
    ignored. No event is raised before ``warmup_steps`` values have been seen.

    Args:
        mode: ``"min"`` (loss) or ``"max"`` (accuracy).
        patience: Updates without improvement tolerated; the event comes on the next one.
        threshold: torch's minimal improvement.
        threshold_mode: ``"rel"`` or ``"abs"``.
        cooldown: Updates after an event during which bad updates are not counted.
        window: Values averaged before comparing.
        noise_sigmas: Improvement needed, in standard errors of the windowed mean.
        warmup_steps: Values to see before any event.
        name: Name used in events.
        signal: The named signal the detector reads (``"loss"``: the watched loss or metric).

    Example:
        >>> det = PlateauDetector(patience=5, window=1, noise_sigmas=0.0, threshold=0.01, warmup_steps=0)
        >>> stream = [1.0, 0.8, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
        >>> [e.step for t, x in enumerate(stream) if (e := det.update(x, t))]
        [9]
    """

    kind = EventKind.PLATEAU
    tracks_progress = True
    value_counts = ("patience", "cooldown", "window", "warmup_steps")
    _STATE_FIELDS = (
        "_n",
        "_n_nonfinite",
        "_recent",
        "_sum",
        "_noise",
        "_prev",
        "_best",
        "_bad",
        "_cooldown_left",
        "_first",
    )

    def __init__(
        self,
        mode: str = "min",
        patience: int = 1000,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        window: int = 100,
        noise_sigmas: float = 2.0,
        warmup_steps: int = 100,
        name: str | None = None,
        signal: str = "loss",
    ) -> None:
        check_choice("mode", mode, ("min", "max"))
        check_number("patience", patience, low=0, integer=True)
        check_number("threshold", threshold, low=0.0)
        check_choice("threshold_mode", threshold_mode, ("rel", "abs"))
        check_number("cooldown", cooldown, low=0, integer=True)
        check_number("window", window, low=1, integer=True)
        check_number("noise_sigmas", noise_sigmas, low=0.0)
        check_number("warmup_steps", warmup_steps, low=0, integer=True)
        self.mode = mode
        self.patience = int(patience)
        self.threshold = float(threshold)
        self.threshold_mode = threshold_mode
        self.cooldown = int(cooldown)
        self.window = int(window)
        self.noise_sigmas = float(noise_sigmas)
        self.warmup_steps = int(warmup_steps)
        super().__init__(name, signal)

    def _reset(self) -> None:
        self._sign = 1.0 if self.mode == "min" else -1.0  # compare sign * value, smaller is better
        self._n = 0
        self._n_nonfinite = 0
        self._recent: deque[float] = deque(maxlen=self.window)
        self._sum = 0.0  # running sum of _recent, made exact again (fsum) once per window
        self._noise = NoiseScale(0.98, 3.0)
        self._prev = math.nan
        self._best = math.inf
        self._first = math.nan  # sign * the first value: where training started
        self._bad = 0
        self._cooldown_left = 0

    @property
    def best(self) -> float:
        """Best windowed mean so far, in the metric's units (``inf``/``-inf`` before the first full window)."""
        return self._sign * self._best

    @property
    def progress(self) -> float:
        """How far the best windowed mean is better than the first value, relative to it (0.3: 30% better; 0 or
        less: no better than where training started). NaN before the first full window."""
        if math.isinf(self._best) or not self._first:
            return math.nan
        return (self._first - self._best) / abs(self._first)

    @property
    def num_bad_steps(self) -> int:
        """Updates since the last improvement (torch's ``num_bad_epochs``)."""
        return self._bad

    def diagnostics(self) -> dict[str, float]:
        return {"bad_steps": float(self._bad), "patience": float(self.patience)}

    def charts(self) -> dict[str, list[str]]:
        return {"{slot}: steps without improvement vs patience": ["{slot}/bad_steps", "{slot}/patience"]}

    def _margins(self) -> tuple[float, float]:
        """torch's margin and the noise margin, an improvement must beat both."""
        torch_margin = abs(self._best) * self.threshold if self.threshold_mode == "rel" else self.threshold
        return torch_margin, self.noise_sigmas * self._noise.sigma / math.sqrt(self.window)

    def _margin(self) -> float:
        return max(self._margins())

    def _margin_name(self) -> str:
        """What sets the margin an improvement must beat: torch's threshold, or the noise of the mean."""
        torch_margin, noise_margin = self._margins()
        return "threshold" if torch_margin >= noise_margin else "noise margin"

    def update(self, value: float, step: int) -> Event | None:
        if type(value) is not float:
            value = to_float(value)
        if not math.isfinite(value):
            self._n_nonfinite += 1
            return None
        self._n += 1
        if self._n > 1:
            self._noise.update(abs(value - self._prev))
        else:
            self._first = self._sign * value
        self._prev = value
        if len(self._recent) == self.window:
            self._sum -= self._recent[0]
        self._recent.append(value)
        self._sum += value
        if self._n % self.window == 0:
            self._sum = math.fsum(self._recent)
        if len(self._recent) < self.window:
            return None
        current = self._sign * self._sum / self.window
        margin = self._margin()
        if current < self._best - margin or math.isinf(self._best):
            self._best = current
            self._bad = 0
        else:
            self._bad += 1
        if self._cooldown_left > 0:
            self._cooldown_left -= 1
            self._bad = 0
        if self._bad > self.patience and self._n >= self.warmup_steps:
            bad, self._bad = self._bad, 0
            self._cooldown_left = self.cooldown
            mean = self._sign * current
            return Event(
                EventKind.PLATEAU,
                step,
                value,
                float(bad),
                float(self.patience),
                self.name,
                f"step {step}: no improvement for {bad} steps (patience {self.patience}): the mean of the last "
                f"{self.window} values, {mean:.4g}, has not improved on the best, {self.best:.4g}, by more than "
                f"the {self._margin_name()} {margin:.2g}",
            )
        return None
