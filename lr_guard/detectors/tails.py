"""How far out this stream's noise reaches: the once-in-100,000 height of one draw, read off its lower tail.

A fixed threshold in robust sigmas fits one tail shape only: 8 sigma is a 1-in-10^15 draw of Gaussian noise, but
about 1 in 1,000 of Student-t(3) noise. :func:`rare_height` reads the shape off the *lower* side of recent scores
(values below the trend): the outliers of real training losses go up only (bad batches), so an upward data spike
never touches the side the noise is read from, while symmetric noise shows its tails there as well. The shape is
the ratio of lower quantiles' distances from the median, the quartile's and a far one's (5%, 2% and 1%, each
with enough values beyond it); it is matched to the Student-t family, whose once-in-``1 / RARE_RATE`` height is then
scaled by the quartile's distance. Quantiles move little when a handful of values (a scheduled LR drop's burst of
low scores) are added, where a mean would.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

__all__ = ["RARE_RATE", "TAIL_PROBS", "T_QUANTILES", "rare_height"]

RARE_RATE = 1e-5  # the share of noise draws allowed above the height: ~1 false alarm in 100,000 values
TAIL_PROBS = (0.01, 0.02, 0.05)  # the far lower quantiles the shape may be read at, farthest first
MIN_BEYOND = 5  # values a far quantile needs beyond it to be read

# (degrees of freedom, isf(0.25), isf(0.01), isf(0.02), isf(0.05), isf(RARE_RATE)) of one Student-t(df) draw
# (inf: Gaussian), from scipy.stats.t.isf (``tests/test_detectors.py`` checks them).
T_QUANTILES: tuple[tuple[float, float, float, float, float, float], ...] = (
    (math.inf, 0.6745, 2.3263, 2.0537, 1.6449, 4.2649),
    (100.0, 0.6770, 2.3642, 2.0809, 1.6602, 4.4784),
    (50.0, 0.6794, 2.4033, 2.1087, 1.6759, 4.7110),
    (30.0, 0.6828, 2.4573, 2.1470, 1.6973, 5.0540),
    (20.0, 0.6870, 2.5280, 2.1967, 1.7247, 5.5428),
    (15.0, 0.6912, 2.6025, 2.2485, 1.7531, 6.1089),
    (12.0, 0.6955, 2.6810, 2.3027, 1.7823, 6.7652),
    (10.0, 0.6998, 2.7638, 2.3593, 1.8125, 7.5270),
    (8.0, 0.7064, 2.8965, 2.4490, 1.8595, 8.9070),
    (7.0, 0.7111, 2.9980, 2.5168, 1.8946, 10.1027),
    (6.0, 0.7176, 3.1427, 2.6122, 1.9432, 12.0317),
    (5.0, 0.7267, 3.3649, 2.7565, 2.0150, 15.5469),
    (4.5, 0.7329, 3.5271, 2.8601, 2.0656, 18.5673),
    (4.0, 0.7407, 3.7469, 2.9985, 2.1318, 23.3322),
    (3.5, 0.7509, 4.0607, 3.1924, 2.2224, 31.5850),
    (3.0, 0.7649, 4.5407, 3.4819, 2.3534, 47.9277),
    (2.5, 0.7850, 5.3531, 3.9555, 2.5582, 87.6433),
    (2.0, 0.8165, 6.9646, 4.8487, 2.9200, 223.6034),
    (1.5, 0.8726, 11.1973, 7.0081, 3.7052, 1124.5001),
)
# per far quantile: its ratio to the quartile (rising as the tails get heavier), and log(rare height / quartile)
_RATIOS = [[row[2 + i] / row[1] for row in T_QUANTILES] for i in range(len(TAIL_PROBS))]
_LOG_HEIGHTS = [math.log(row[5] / row[1]) for row in T_QUANTILES]


def _lower_quantile(ordered: Sequence[float], p: float) -> float:
    """The ``p`` quantile of sorted values (linear between order statistics)."""
    x = p * len(ordered) - 0.5
    i = min(max(int(x), 0), len(ordered) - 2)
    w = min(max(x - i, 0.0), 1.0)
    return ordered[i] + w * (ordered[i + 1] - ordered[i])


def _log_height(far: int, ratio: float) -> float:
    """log(rare height / quartile) of the Student-t whose ``TAIL_PROBS[far]`` quantile is ``ratio`` quartiles."""
    ratios = _RATIOS[far]
    i = bisect.bisect_left(ratios, ratio)
    if i == 0:
        return _LOG_HEIGHTS[0]
    if i == len(ratios):
        return _LOG_HEIGHTS[-1]
    w = (ratio - ratios[i - 1]) / (ratios[i] - ratios[i - 1])
    return _LOG_HEIGHTS[i - 1] + w * (_LOG_HEIGHTS[i] - _LOG_HEIGHTS[i - 1])


def rare_height(ordered: Sequence[float], min_spread: float = 0.0) -> float:
    """The score that noise with these values' lower tail exceeds once in ``1 / RARE_RATE`` values, from sorted
    scores (at least 2); NaN when their lower quartile is not more than ``min_spread`` below their median (values
    that hardly vary have no tail shape to read).

    The height is the median plus the quartile's distance times the Student-t rare height for the tail shape. The
    shape is read at each of ``TAIL_PROBS`` with ``MIN_BEYOND`` values beyond it (at 5% alone with fewer values),
    and the middle of the three heights so found is taken: one far quantile alone moves with a handful of values
    (six low outliers among 600 scores make the 1% quantile look like Student-t(5) in the modded-nanogpt log,
    whose 2% and 5% quantiles are Gaussian). While the 1% quantile cannot be read yet, the lowest height is taken:
    a few hundred values early in a run, while the noise scale is still settling, overstate the tails. Between
    the table's rows the log of the height is interpolated; beyond its ends, the end row holds.
    """
    n = len(ordered)
    mid = n // 2
    centre = ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
    quartile = centre - _lower_quantile(ordered, 0.25)
    if not quartile > min_spread:
        return math.nan
    usable = [i for i, p in enumerate(TAIL_PROBS) if p * n >= MIN_BEYOND] or [len(TAIL_PROBS) - 1]
    logs = sorted(_log_height(i, (centre - _lower_quantile(ordered, TAIL_PROBS[i])) / quartile) for i in usable)
    log_height = logs[len(logs) // 2] if len(logs) == len(TAIL_PROBS) else logs[0]
    return centre + quartile * math.exp(log_height)
