"""PlateauDetector: no statistically meaningful improvement of a smoothed metric for ``patience`` updates."""

from __future__ import annotations

import bisect
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

    **Patience as a share of the run** (``patience_share``, an option). A fixed patience fits one cadence
    only: 1000 values is longer than a whole per-epoch log, and far too short for a slowly improving LLM run with
    heavy-tailed noise. With ``patience_share`` the patience after ``n`` values is
    ``max(patience, ceil(patience_share * n))``, and the compared level is the ``level_quantile`` of the last
    ``min(window, patience)`` values instead of their mean: a low quantile follows the bulk of a stream whose
    noise has a long upper tail (outliers of +1 nat do not move it), and a window that grows with the run makes
    the noise margin shrink as the run's own rate of progress does. So a plateau is "no improvement beyond the
    noise for a quarter of the run seen so far", whatever the cadence: a run stuck at chance level is one, a
    slowly improving run is not. Measured on the real curves with ``patience=5, window=1000, noise_sigmas=1.25,
    patience_share=0.25, level_quantile=0.1``: the stuck CTC run (every 100 steps) gives a plateau at step 11,400,
    the two healthy GPT-2 logs, the Muon record and the noisy ViT run none. It is not the default: on the
    synthetic suite it also fires where the loss rises during an LR warm-up or creeps down below the noise.

    For one value per epoch or per validation run, ``window=1, noise_sigmas=0, patience_share=None`` is exactly
    torch's rule. Values are used as they are (no log), so ``mode="max"`` fits accuracies. Non-finite values are
    ignored. No event is raised before ``warmup_steps`` values have been seen.

    Args:
        mode: ``"min"`` (loss) or ``"max"`` (accuracy).
        patience: Updates without improvement tolerated; the event comes on the next one.
        threshold: torch's minimal improvement.
        threshold_mode: ``"rel"`` or ``"abs"``.
        cooldown: Updates after an event during which bad updates are not counted.
        window: Values averaged before comparing.
        noise_sigmas: Improvement needed, in standard errors of the windowed level.
        warmup_steps: Values to see before any event.
        patience_share: ``None`` (a fixed ``patience``) or the share of the values seen so far that the patience
            grows to (``patience`` is then its minimum).
        level_quantile: ``None`` (the windowed mean) or the quantile of the window compared (0.1: its 10th
            percentile, in the direction of ``mode``).
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
        "_sorted",
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
        patience_share: float | None = None,
        level_quantile: float | None = None,
    ) -> None:
        check_choice("mode", mode, ("min", "max"))
        check_number("patience", patience, low=0, integer=True)
        check_number("threshold", threshold, low=0.0)
        check_choice("threshold_mode", threshold_mode, ("rel", "abs"))
        check_number("cooldown", cooldown, low=0, integer=True)
        check_number("window", window, low=1, integer=True)
        check_number("noise_sigmas", noise_sigmas, low=0.0)
        check_number("warmup_steps", warmup_steps, low=0, integer=True)
        if patience_share is not None:
            check_number("patience_share", patience_share, low=0.0, high=1.0, low_open=True)
        if level_quantile is not None:
            check_number("level_quantile", level_quantile, low=0.0, high=1.0)
        self.mode = mode
        self.patience = int(patience)
        self.threshold = float(threshold)
        self.threshold_mode = threshold_mode
        self.cooldown = int(cooldown)
        self.window = int(window)
        self.noise_sigmas = float(noise_sigmas)
        self.warmup_steps = int(warmup_steps)
        self.patience_share = None if patience_share is None else float(patience_share)
        self.level_quantile = None if level_quantile is None else float(level_quantile)
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
        self._sorted: list[float] = []  # sign * the values of _recent, sorted (with level_quantile)
        if self.patience_share is not None:  # the window grows with the run: trimmed in update, not by maxlen
            self._recent = deque()

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

    @property
    def current_patience(self) -> int:
        """The patience now: ``patience``, or with ``patience_share`` the share of the values seen so far."""
        if self.patience_share is None:
            return self.patience
        return max(self.patience, math.ceil(self.patience_share * self._n))

    def diagnostics(self) -> dict[str, float]:
        return {"bad_steps": float(self._bad), "patience": float(self.current_patience)}

    def charts(self) -> dict[str, list[str]]:
        return {"{slot}: steps without improvement vs patience": ["{slot}/bad_steps", "{slot}/patience"]}

    def _margins(self, window: int) -> tuple[float, float]:
        """torch's margin and the noise margin of a level over ``window`` values: an improvement must beat both."""
        torch_margin = abs(self._best) * self.threshold if self.threshold_mode == "rel" else self.threshold
        return torch_margin, self.noise_sigmas * self._noise.sigma / math.sqrt(window)

    def _margin(self, window: int) -> float:
        return max(self._margins(window))

    def _margin_name(self, window: int) -> str:
        """What sets the margin an improvement must beat: torch's threshold, or the noise of the level."""
        torch_margin, noise_margin = self._margins(window)
        return "threshold" if torch_margin >= noise_margin else "noise margin"

    def _level(self, value: float) -> tuple[float, int] | None:
        """Take in ``value``; the compared level (``sign`` applied) and the window it is over, or ``None`` while
        the window is not full."""
        recent, patience = self._recent, self.current_patience
        window = self.window if self.patience_share is None else min(self.window, patience)
        if self.level_quantile is not None:
            bisect.insort(self._sorted, self._sign * value)
        if len(recent) == recent.maxlen:
            self._drop_oldest()
        recent.append(value)
        self._sum += value
        while len(recent) > window:
            self._drop_oldest()
        if self._n % self.window == 0:
            self._sum = math.fsum(recent)
        if len(recent) < window:
            return None
        if self.level_quantile is None:
            return self._sign * self._sum / window, window
        ordered = self._sorted
        return ordered[int(self.level_quantile * (len(ordered) - 1))], window

    def _drop_oldest(self) -> None:
        old = self._recent.popleft()
        self._sum -= old
        if self.level_quantile is not None:
            del self._sorted[bisect.bisect_left(self._sorted, self._sign * old)]

    def _level_name(self) -> str:
        if self.level_quantile is None:
            return "mean"
        return f"{self.level_quantile:g} quantile"

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
        level = self._level(value)
        if level is None:
            return None
        current, window = level
        margin = self._margin(window)
        if current < self._best - margin or math.isinf(self._best):
            self._best = current
            self._bad = 0
        else:
            self._bad += 1
        if self._cooldown_left > 0:
            self._cooldown_left -= 1
            self._bad = 0
        patience = self.current_patience
        if self._bad > patience and self._n >= self.warmup_steps:
            bad, self._bad = self._bad, 0
            self._cooldown_left = self.cooldown
            mean = self._sign * current
            return Event(
                EventKind.PLATEAU,
                step,
                value,
                float(bad),
                float(patience),
                self.name,
                f"step {step}: no improvement for {bad} steps (patience {patience}): the {self._level_name()} of "
                f"the last {window} values, {mean:.4g}, has not improved on the best, {self.best:.4g}, by more "
                f"than the {self._margin_name(window)} {margin:.2g}",
            )
        return None
