"""The LR range test's result and its reading of a sweep (pure NumPy/SciPy: no torch, no Lightning).

:func:`lr_guard.find_lr` runs the sweep on a Trainer; :func:`read_sweep` turns the losses it saw into the
convergence threshold, the steepest descent and a suggested start LR. The definitions (also in the README):

- **Smoothed loss** ``s``: the log of the loss (the loss itself if any value is <= 0), put through a centred
  running median and then a centred running mean, both ``window`` steps wide (a tenth of the sweep, at least
  5). The sweep is read after it ends, so the smoothing is centred and does not lag the LR.
- **Margin** ``delta``: the larger of a doubling of the loss (``log 2``: the divergence detector's ``factor``) and
  3 times the noise of the smoothed curve, the robust sigma (1.4826 MAD) of the loss around its running median
  divided by the square root of ``window`` (for losses <= 0: 5% of the loss's range instead of the doubling).
- **Rise**: the step from which on ``s`` stays more than ``delta`` above its lowest value so far, to the end of
  the sweep (an earlier bump that the loss falls back from does not count); if there is none, the step at which
  the divergence detector stopped the sweep.
- **Convergence threshold**: the LR of the last step before the rise -- the largest LR at which the smoothed loss
  still stood within the margin of its lowest value so far, and after which it never came back. ``None`` when the
  loss never rose (raise ``max_lr``).
- **Steepest descent**: the LR at which ``s`` falls fastest against ``log(lr)``, at or below the threshold.
- **Suggestion**: ``SUGGESTED_FRACTION`` times the threshold (see its comment for the measurement behind it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.ndimage import median_filter, uniform_filter1d

__all__ = ["SUGGESTED_FRACTION", "RangeTestResult", "read_sweep"]

# The start LR suggested below the convergence threshold, measured by `python benchmarks/range_test.py --seeds 5`
# (300-step runs; SGD and a cosine schedule on a regression and a digits MLP, Adam or AdamW with a warm-up and a
# cosine decay on the digits MLP and a byte-level LM, the suggestion as the peak; each against the best of a 10-LR
# grid): a third ends within 1% of the tuned run on the regression and the LM, +2% +- 15 on the digits with SGD and
# +18% +- 25 with Adam (the MLP overfits; on its training loss the tuned LR is 2-5x higher). No other fraction (1,
# 1/2, 1/5, 1/10) does better on all four: a fifth or a tenth suits the digits but ends 28-74% above on the
# regression. See the README's range test section.
SUGGESTED_FRACTION = 1 / 3
_MIN_RISE = math.log(2.0)
_NOISE_SIGMAS = 3.0
_PLOT_HINT = "RangeTestResult.plot() needs matplotlib: pip install 'lr_guard[plot]'"


@dataclass(frozen=True)
class RangeTestResult:
    """What an LR range test saw and what it reads from it (see :mod:`lr_guard.range_test` for the definitions).

    Attributes:
        lrs: The LR of each sweep step (of the first param group; the others keep their ratio to it).
        losses: The loss of each step (the mean over accumulated micro-batches).
        threshold: The convergence threshold: the largest LR at which the loss still fell; ``None`` if it never
            rose.
        steepest: The LR at which the smoothed loss fell fastest against ``log(lr)``.
        suggestion: The suggested start LR, ``None`` when there is no threshold.
        reason: Why ``suggestion`` is what it is, in words.
        stopped_early: Whether the divergence detector stopped the sweep before its last step.
        smoothed: The smoothed loss of each step (in log space when every loss is positive; NaN where the loss was
            not finite).
    """

    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    threshold: float | None
    steepest: float | None
    suggestion: float | None
    reason: str
    stopped_early: bool
    smoothed: tuple[float, ...] = ()

    def plot(self, ax: Any = None) -> Any:
        """Draw the loss against the LR (log axis) with the threshold, the steepest descent and the suggestion
        marked; returns the matplotlib ``Axes``. Needs matplotlib (``pip install 'lr_guard[plot]'``)."""
        try:
            import matplotlib.pyplot as plt
        except ImportError as err:
            raise ImportError(_PLOT_HINT) from err
        if ax is None:
            _, ax = plt.subplots()
        ax.plot(self.lrs, self.losses, color="0.7", label="loss")
        if self.smoothed:
            log_space = all(v > 0 for v in self.losses if math.isfinite(v))
            smooth = np.exp(self.smoothed) if log_space else np.asarray(self.smoothed)
            ax.plot(self.lrs, smooth, color="C0", label="smoothed")
        marks = (("threshold", self.threshold, "C3"), ("steepest", self.steepest, "C2"))
        for label, lr, color in (*marks, ("suggestion", self.suggestion, "C1")):
            if lr is not None:
                ax.axvline(lr, color=color, linestyle="--", label=f"{label} {lr:.3g}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        ax.set_title(self.reason, fontsize="small", wrap=True)
        ax.legend()
        return ax


def _smooth(y: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """The centred running median of ``y`` and its centred running mean (both ``window`` wide)."""
    med = median_filter(y, size=window, mode="nearest")
    return med, uniform_filter1d(med, size=window, mode="nearest")


def read_sweep(lrs: Sequence[float], losses: Sequence[float], stopped_at: int | None = None) -> RangeTestResult:
    """Read a finished sweep: ``lrs`` and ``losses`` per step, ``stopped_at`` the step at which the divergence
    detector fired (``None`` if it never did).

    Example:
        >>> lrs = [1e-4 * 10 ** (k / 20) for k in range(80)]  # 1e-4 .. 0.9, the loss rising past lr 0.1
        >>> losses = [1 / (1 + 10 * lr) if lr < 0.1 else 1 / (1 + 10 * lr) + 30 * (lr - 0.1) for lr in lrs]
        >>> r = read_sweep(lrs, losses)
        >>> f"{r.threshold:.3g}", r.suggestion == r.threshold * SUGGESTED_FRACTION
        ('0.126', True)
    """
    if len(lrs) != len(losses):
        raise ValueError(f"lrs and losses must have one value per step; got {len(lrs)} LRs and {len(losses)} losses")
    lr_arr, loss_arr = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    finite = np.isfinite(loss_arr)
    end = len(loss_arr) if finite.all() else int(np.argmin(finite))  # the sweep is read up to its first NaN/inf
    if stopped_at is not None:
        end = min(end, stopped_at)
    smoothed = np.full(len(loss_arr), np.nan)

    def result(threshold: float | None, steepest: float | None, reason: str) -> RangeTestResult:
        suggestion = None if threshold is None else threshold * SUGGESTED_FRACTION
        steps = (tuple(map(float, lr_arr)), tuple(map(float, loss_arr)))
        return RangeTestResult(*steps, threshold, steepest, suggestion, reason, stopped_at is not None, tuple(smoothed))

    if end < 5 and end == len(loss_arr) and stopped_at is None:
        return result(None, None, f"the sweep ran only {end} step(s): too few to read (at least 5)")
    if end < 5:
        return result(None, None, f"the loss diverged after {end} step(s), already at lr {lr_arr[0]:.3g}: lower min_lr")
    head = loss_arr[:end]
    positive = bool((head > 0).all())
    y = np.log(head) if positive else head
    window = max(5, end // 10) | 1
    med, s = _smooth(y, window)
    smoothed[:end] = s
    noise = 1.4826 * float(np.median(np.abs(y - med))) / math.sqrt(window)
    delta = max(_MIN_RISE if positive else 0.05 * float(np.ptp(y)), _NOISE_SIGMAS * noise)
    calm = np.flatnonzero(s <= np.minimum.accumulate(s) + delta)
    rise = int(calm[-1]) + 1 if calm.size else 0  # the start of the last stretch above the margin
    last = rise - 1  # the last step within the margin (rise == end: the loss never rose)
    slope = np.gradient(s[: last + 1], np.log(lr_arr[: last + 1])) if last >= 1 else np.zeros(1)
    steepest = float(lr_arr[int(np.argmin(slope))])
    if rise == end and stopped_at is None:
        return result(
            None,
            steepest,
            f"the loss still fell at the last lr {lr_arr[end - 1]:.3g}: no convergence threshold below it; "
            "raise max_lr",
        )
    threshold = float(lr_arr[max(last, 0)])
    if rise == end:
        rose = f"the divergence detector stopped the sweep at lr {lr_arr[min(end, len(lr_arr) - 1)]:.3g}"
    elif positive:
        rose = f"from lr {lr_arr[rise]:.3g} on, the smoothed loss stayed over {math.exp(delta):.2g}x its lowest"
    else:
        rose = f"from lr {lr_arr[rise]:.3g} on, the smoothed loss stayed over {delta:.3g} above its lowest"
    return result(
        threshold,
        steepest,
        f"{SUGGESTED_FRACTION:.2g} x the convergence threshold {threshold:.3g}, the largest lr at which the loss "
        f"still held ({rose})",
    )
