"""How far out this stream's noise reaches: the once-in-100,000 height of one draw, from the stream's own tails.

A fixed threshold in robust sigmas fits one tail shape only: 8 sigma is a 1-in-10^15 draw of Gaussian noise, but
about 1 in 1,000 of Student-t(3) noise. :func:`rare_level` reads the shape off recent first differences ``|dy|``
(which a falling trend barely touches): ``mean(|dy|) / median(|dy|)`` is 1.18 for Gaussian noise, 1.24 for
Student-t(6) and 1.37 for Student-t(3). It is matched to the Student-t family, whose once-in-``1 / RARE_RATE``
height (one-sided, one draw) is then scaled by the median ``|dy|``. The mean uses every value, so it varies far
less than a high quantile of the same few hundred values would.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable

__all__ = ["RARE_RATE", "TAIL_TABLE", "rare_level"]

RARE_RATE = 1e-5  # the share of noise draws allowed above the level: ~1 false alarm in 100,000 values

# (degrees of freedom, mean(|d|) / median(|d|), isf(RARE_RATE) / median(|d|)) for the difference d = x1 - x2 of
# two Student-t(df) draws (inf: Gaussian); isf is that of one draw. Computed from 2e7 draws of d per row and
# scipy.stats.t.isf (``tests/test_detectors.py`` checks it against a fresh sample).
TAIL_TABLE: tuple[tuple[float, float, float], ...] = (
    (math.inf, 1.1832, 4.472),
    (100.0, 1.1853, 4.662),
    (50.0, 1.1877, 4.871),
    (30.0, 1.1912, 5.178),
    (20.0, 1.1958, 5.613),
    (15.0, 1.2012, 6.115),
    (10.0, 1.2127, 7.360),
    (8.0, 1.2229, 8.557),
    (6.0, 1.2424, 11.227),
    (5.0, 1.2610, 14.167),
    (4.0, 1.2940, 20.502),
    (3.5, 1.3229, 27.068),
    (3.0, 1.3682, 39.648),
    (2.5, 1.4500, 69.091),
    (2.0, 1.6272, 163.745),
    (1.5, 2.2051, 726.454),
)
_RATIOS = [row[1] for row in TAIL_TABLE]
_LOG_LEVELS = [math.log(row[2]) for row in TAIL_TABLE]


def rare_level(abs_diffs: Iterable[float]) -> float:
    """The height above its centre (in the units of ``abs_diffs``, the ``|dy|`` of recent values) that one draw of
    noise with their tails exceeds once in ``1 / RARE_RATE`` values; NaN when there are none or their median is 0.

    Between the table's rows the log of the level is interpolated; beyond its ends, the end row holds.
    """
    ordered = sorted(abs_diffs)
    n = len(ordered)
    if not n:
        return math.nan
    mid = n // 2
    med = ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
    if not med > 0.0:
        return math.nan
    ratio = sum(ordered) / n / med
    i = bisect.bisect_left(_RATIOS, ratio)
    if i == 0:
        return med * TAIL_TABLE[0][2]
    if i == len(_RATIOS):
        return med * TAIL_TABLE[-1][2]
    lo, hi = _RATIOS[i - 1], _RATIOS[i]
    w = (ratio - lo) / (hi - lo)
    return med * math.exp(_LOG_LEVELS[i - 1] + w * (_LOG_LEVELS[i] - _LOG_LEVELS[i - 1]))
