"""PlateauDetector: no statistically meaningful improvement of a smoothed metric for ``patience`` updates."""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Any

from lr_guard.detectors.base import Detector, NoiseScale, check_choice, check_number, to_float
from lr_guard.events import Event, EventKind

__all__ = ["PlateauDetector"]

# What patience=None (a patience that is a share of the run) and a fixed patience default to; chosen by
# measurement (``python benchmarks/detection.py``, the real curves in ``tests/test_detectors.py``)
SHARE_DEFAULTS: dict[str, Any] = {"patience_share": 1 / 3, "min_patience": 25, "max_patience": 5000, "rise_sigmas": 8.0}
SHARE_DEFAULTS.update(window=1000, noise_sigmas=1.25)
FIXED_DEFAULTS: dict[str, Any] = {"window": 100, "noise_sigmas": 2.0}


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

    **Patience as a share of the run** (the default, ``patience=None``). A fixed patience fits one cadence only:
    1000 values is longer than a whole log of one value per 100 steps, and too short for a slowly improving LLM
    run with heavy-tailed noise. So by default the patience after ``n`` values is ``ceil(patience_share * n)`` --
    a third of the run seen so far -- at least ``min_patience`` (25) and at most ``max_patience`` (5000), and the
    level is the mean of the last ``min(window, patience now)`` values (``window`` 1000): a window that grows
    with the run makes the noise margin shrink as the run's own rate of progress does. A plateau is then "no
    improvement beyond the noise (``noise_sigmas`` 1.25) for a third of the run seen so far", whatever the
    cadence: a run stuck at chance level is one, a slowly improving run is not. A level more than ``rise_sigmas``
    (8) standard errors worse than the best rebases the best to it: a loss that goes up (as during an LR
    warm-up) is not a plateau, and if it then stays up, the plateau is counted from there. Updates without
    improvement are counted from the end of ``warmup_steps``. Measured (``python benchmarks/detection.py`` and
    the real curves in ``tests/test_detectors.py``): the stuck CTC run (one value every 100 steps) gives a plateau
    at step 14,900; the two healthy GPT-2 logs, the noisy 19k-step LM run, the Muon record and the noisy ViT run
    none before their last 15%.

    **A fixed patience** (``patience=N``): torch's rule on the mean of the last ``window`` (100) values with a
    noise margin of ``noise_sigmas`` (2); with ``window=1, noise_sigmas=0`` it is exactly torch's rule. The
    default for one value per epoch or per validation run (:func:`lr_guard.config.validation_plateau`) is
    ``patience=5, threshold=0, window=1, noise_sigmas=0.5``: an improvement must beat the best by half the run's
    typical change from one value to the next, which holds both its pace and its noise.
    ``level_quantile`` compares a quantile of the window instead of its mean, for noise with a long upper tail.
    Values are used as they are (no log), so ``mode="max"`` fits accuracies. Non-finite values are ignored.

    Args:
        mode: ``"min"`` (loss) or ``"max"`` (accuracy).
        patience: ``None`` (a share of the run seen so far) or the updates without improvement tolerated; the
            event comes on the next one.
        threshold: torch's minimal improvement.
        threshold_mode: ``"rel"`` or ``"abs"``.
        cooldown: Updates after an event during which bad updates are not counted.
        window: Values averaged before comparing (``None``: 1000 with a share patience, no more than the patience
            now; 100 with a fixed one).
        noise_sigmas: Improvement needed, in standard errors of the windowed level (``None``: 1.25 with a share
            patience, 2 with a fixed one).
        warmup_steps: Values to see before updates without improvement are counted.
        patience_share: With ``patience=None``: the share of the values seen so far tolerated (``None``: 1/3).
        level_quantile: ``None`` (the windowed mean) or the quantile of the window compared (0.1: its 10th
            percentile, in the direction of ``mode``).
        min_patience: With ``patience=None``: the least patience (``None``: 25).
        max_patience: With ``patience=None``: the most patience (``None``: 5000).
        rise_sigmas: The standard errors by which a level must be worse than the best to rebase the best to it
            (``None``: 8 with a share patience, off with a fixed one: torch's rule).
        name: Name used in events.
        signal: The named signal the detector reads (``"loss"``: the watched loss or metric).

    Example:
        >>> det = PlateauDetector(
        ...     patience=5, window=1, noise_sigmas=0.0, threshold=0.01, warmup_steps=0
        ... )
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
        "_lowest",
        "_lowest_at",
        "_lost",
    )

    def __init__(
        self,
        mode: str = "min",
        patience: int | None = None,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        window: int | None = None,
        noise_sigmas: float | None = None,
        warmup_steps: int = 100,
        name: str | None = None,
        signal: str = "loss",
        patience_share: float | None = None,
        level_quantile: float | None = None,
        min_patience: int | None = None,
        max_patience: int | None = None,
        rise_sigmas: float | None = None,
    ) -> None:
        check_choice("mode", mode, ("min", "max"))
        shared = patience is None
        if shared:
            patience_share = SHARE_DEFAULTS["patience_share"] if patience_share is None else patience_share
            check_number("patience_share", patience_share, low=0.0, high=1.0, low_open=True)
            min_patience = SHARE_DEFAULTS["min_patience"] if min_patience is None else min_patience
            check_number("min_patience", min_patience, low=0, integer=True)
            max_patience = SHARE_DEFAULTS["max_patience"] if max_patience is None else max_patience
            check_number("max_patience", max_patience, low=max(1, int(min_patience)), integer=True)
            rise_sigmas = SHARE_DEFAULTS["rise_sigmas"] if rise_sigmas is None else rise_sigmas
        else:
            check_number("patience", patience, low=0, integer=True)
            given = {"patience_share": patience_share, "min_patience": min_patience, "max_patience": max_patience}
            for key, value in given.items():
                if value is not None:
                    raise ValueError(
                        f"{key}={value!r} sets a patience that is a share of the run, but patience={patience!r} "
                        f"fixes it; pass patience=None (the default) to use {key}, or leave {key} out"
                    )
        window = (SHARE_DEFAULTS if shared else FIXED_DEFAULTS)["window"] if window is None else window
        noise_sigmas = (
            (SHARE_DEFAULTS if shared else FIXED_DEFAULTS)["noise_sigmas"] if noise_sigmas is None else noise_sigmas
        )
        check_number("threshold", threshold, low=0.0)
        check_choice("threshold_mode", threshold_mode, ("rel", "abs"))
        check_number("cooldown", cooldown, low=0, integer=True)
        check_number("window", window, low=1, integer=True)
        check_number("noise_sigmas", noise_sigmas, low=0.0)
        check_number("warmup_steps", warmup_steps, low=0, integer=True)
        if level_quantile is not None:
            check_number("level_quantile", level_quantile, low=0.0, high=1.0)
        if rise_sigmas is not None:
            check_number("rise_sigmas", rise_sigmas, low=0.0)
        self.mode = mode
        self.patience = None if patience is None else int(patience)
        self.threshold = float(threshold)
        self.threshold_mode = threshold_mode
        self.cooldown = int(cooldown)
        self.window = int(window)
        self.noise_sigmas = float(noise_sigmas)
        self.warmup_steps = int(warmup_steps)
        self.patience_share = None if patience_share is None else float(patience_share)
        self.level_quantile = None if level_quantile is None else float(level_quantile)
        self.min_patience = None if min_patience is None else int(min_patience)
        self.max_patience = None if max_patience is None else int(max_patience)
        self.rise_sigmas = None if rise_sigmas is None else float(rise_sigmas)
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
        self._lowest = math.inf  # the best level ever (a rebase to a risen level does not raise it) ...
        self._lowest_at: int | None = None  # ... and its step: where the run's progress stopped (Event.began)
        self._lost = False  # the level now is worse than that best by more than an improvement's margin
        self._cooldown_left = 0
        self._sorted: list[float] = []  # sign * the values of _recent, sorted (with level_quantile)
        if self.patience is None:  # the window grows with the run: trimmed in update, not by maxlen
            self._recent = deque()

    def scaled_counts(self) -> tuple[str, ...]:
        """With ``patience_share`` only ``cooldown`` counts steps: the patience is a share of the run at any
        cadence, and ``patience``, ``window`` and ``warmup_steps`` are the values a level needs to be trusted."""
        return type(self).value_counts if self.patience is not None else ("cooldown",)

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
    def best_step(self) -> int | None:
        """The step of the best level this detector has seen (a rebase to a risen level does not move it): where
        the run's progress stopped, a plateau event's ``began``. ``None`` before the first full window."""
        return self._lowest_at

    @property
    def progress_lost(self) -> bool:
        """Whether the level now is worse than the best level ever (:attr:`best_step`) by more than an
        improvement must beat it by: the run has lost ground since, not only stopped gaining it."""
        return self._lost

    @property
    def num_bad_steps(self) -> int:
        """Updates since the last improvement (torch's ``num_bad_epochs``)."""
        return self._bad

    @property
    def current_patience(self) -> int:
        """The patience now: ``patience``, or (``patience=None``) the share of the values seen so far, within
        ``min_patience`` .. ``max_patience``."""
        if self.patience is not None:
            return self.patience
        assert self.patience_share is not None and self.min_patience is not None and self.max_patience is not None
        return min(self.max_patience, max(self.min_patience, math.ceil(self.patience_share * self._n)))

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
        window = self.window if self.patience is not None else min(self.window, patience)
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

    def _rose(self, current: float, window: int) -> bool:
        """Whether the level has risen above the best by more than ``rise_sigmas`` standard errors: the loss is
        going up (as in an LR warm-up), which is not a plateau; the best is rebased to the level."""
        if self.rise_sigmas is None:
            return False
        return current > self._best + self.rise_sigmas * self._noise.sigma / math.sqrt(window)

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
        if current < self._lowest:
            self._lowest, self._lowest_at = current, step
        margin = self._margin(window)
        self._lost = current > self._lowest + margin
        if current < self._best - margin or math.isinf(self._best) or self._rose(current, window):
            self._best = current
            self._bad = 0
        else:
            self._bad += 1
        if self._cooldown_left > 0:
            self._cooldown_left -= 1
            self._bad = 0
        if self._n < self.warmup_steps:  # the updates without improvement are counted from the end of the warm-up
            self._bad = 0
        patience = self.current_patience
        if self._bad > patience:
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
                f"step {step}: no improvement for {bad} values (patience {patience}): the {self._level_name()} of "
                f"the last {window} values, {mean:.4g}, has not improved on the best, {self.best:.4g}, by more "
                f"than the {self._margin_name(window)} {margin:.2g}",
                began=self._lowest_at,
            )
        return None
