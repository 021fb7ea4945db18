"""How far out this stream's noise reaches: the once-in-33,000 height of a spike score, read off its lower tail.

A fixed threshold in robust sigmas fits one tail shape only: 8 sigma is a 1-in-10^15 draw of Gaussian noise, but
about 1 in 1,000 of Student-t(3) noise. :func:`rare_height` reads the shape off the *lower* side of recent scores
(values below the trend): the outliers of real training losses go up only (bad batches), so an upward data spike
never touches the side the noise is read from, while symmetric noise shows its tails there as well. The shape is
the ratio of lower quantiles' distances from the median, the quartile's and a far one's (5%, 2% and 1%, each
with enough values beyond it); it is matched to the scores the spike detector gives Student-t noise, whose
once-in-``1 / RARE_RATE`` height is then scaled by the quartile's distance. Quantiles move little when a handful of
values (a scheduled LR drop's burst of low scores) are added, where a mean would.

The table is of the detector's *scores*, not of single Student-t draws: a score is a draw less an EMA trend that
carries the last draws, over a noise scale that moves with them, less the scores' centre, and that lightens the
middle of the distribution more than its far tail. Matched to single draws, Student-t(3) scores read as
Student-t(3.5) and their rare height as 31 quartiles where it is 39. ``benchmarks/calibrate_tails.py`` makes the
table, from 4e7 scores per row of stationary noise fed through the default detector's recursion
(``tests/test_detectors.py`` checks that recursion against ``SpikeDetector`` and re-makes two rows from fewer
scores). The rate is 3e-5 rather than 1e-5: a height read from a few thousand scores is loose (a factor 1.3 either
way at 2,000) and the spike detector raises it while few scores are known, so the rate a run sees is lower than the
rate aimed at; the detection benchmark's spike F1 is 0.90 at 3e-5 against 0.86 at 1e-5 on Student-t(6) noise, and
0.90 against 0.89 on Student-t(3) (``python benchmarks/detection.py --noise student_t6 student_t3 --detectors
spike``, with the table re-made by ``benchmarks/calibrate_tails.py --rate 1e-5``).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

__all__ = ["RARE_RATE", "SCORE_TAILS", "TAIL_PROBS", "rare_height"]

RARE_RATE = 3e-5  # the share of noise values allowed above the height: ~1 false alarm in 33,000 values
TAIL_PROBS = (0.01, 0.02, 0.05)  # the far lower quantiles the shape may be read at, farthest first
MIN_BEYOND = 5  # values a far quantile needs beyond it to be read

# (degrees of freedom of the noise (inf: Gaussian), then the spike detector's scores' lower 1%, 2% and 5% quantiles'
# distances from their median and their upper once-in-1/RARE_RATE height above it, each in lower-quartile distances)
# from ``python benchmarks/calibrate_tails.py`` (SpikeDetector() defaults; 4e7 scores a row).
SCORE_TAILS: tuple[tuple[float, float, float, float, float], ...] = (
    (math.inf, 3.5210, 3.0934, 2.4618, 6.3479),
    (100.0, 3.5518, 3.1142, 2.4720, 6.5437),
    (50.0, 3.5874, 3.1379, 2.4827, 6.7222),
    (30.0, 3.6356, 3.1695, 2.4975, 7.0259),
    (20.0, 3.6988, 3.2100, 2.5164, 7.4809),
    (15.0, 3.7622, 3.2516, 2.5355, 7.9762),
    (12.0, 3.8340, 3.2960, 2.5553, 8.5475),
    (10.0, 3.9093, 3.3437, 2.5769, 9.2197),
    (8.0, 4.0269, 3.4182, 2.6087, 10.4764),
    (7.0, 4.1146, 3.4716, 2.6315, 11.4707),
    (6.0, 4.2438, 3.5479, 2.6627, 13.0994),
    (5.0, 4.4373, 3.6620, 2.7088, 15.9397),
    (4.5, 4.5748, 3.7405, 2.7397, 18.3866),
    (4.0, 4.7627, 3.8476, 2.7800, 21.7866),
    (3.5, 5.0274, 3.9914, 2.8333, 27.4810),
    (3.0, 5.4234, 4.2067, 2.9081, 39.1255),
    (2.5, 6.0761, 4.5425, 3.0177, 64.5004),
    (2.0, 7.3256, 5.1501, 3.2007, 134.8976),
    (1.5, 10.3377, 6.4978, 3.5428, 522.9537),
)
# per far quantile: its ratio to the quartile (rising as the tails get heavier), and log(rare height / quartile)
_RATIOS = [[row[1 + i] for row in SCORE_TAILS] for i in range(len(TAIL_PROBS))]
_LOG_HEIGHTS = [math.log(row[4]) for row in SCORE_TAILS]


def _lower_quantile(ordered: Sequence[float], p: float) -> float:
    """The ``p`` quantile of sorted values (linear between order statistics)."""
    x = p * len(ordered) - 0.5
    i = min(max(int(x), 0), len(ordered) - 2)
    w = min(max(x - i, 0.0), 1.0)
    return ordered[i] + w * (ordered[i + 1] - ordered[i])


def _log_height(far: int, ratio: float) -> float:
    """log(rare height / quartile) of the scores of the Student-t noise whose ``TAIL_PROBS[far]`` quantile is
    ``ratio`` quartiles."""
    ratios = _RATIOS[far]
    i = bisect.bisect_left(ratios, ratio)
    if i == 0:
        return _LOG_HEIGHTS[0]
    if i == len(ratios):
        return _LOG_HEIGHTS[-1]
    w = (ratio - ratios[i - 1]) / (ratios[i] - ratios[i - 1])
    return _LOG_HEIGHTS[i - 1] + w * (_LOG_HEIGHTS[i] - _LOG_HEIGHTS[i - 1])


def rare_height(ordered: Sequence[float], min_spread: float = 0.0) -> float:
    """The score that noise with these scores' lower tail exceeds once in ``1 / RARE_RATE`` values, from sorted
    spike scores (at least 2); NaN when their lower quartile is not more than ``min_spread`` below their median
    (values that hardly vary have no tail shape to read).

    The height is the median plus the quartile's distance times the rare height of the Student-t noise's scores
    with that tail shape. The shape is read at each of ``TAIL_PROBS`` with ``MIN_BEYOND`` values beyond it (at 5%
    alone with fewer values), and the middle of the three heights so found is taken: one far quantile alone moves
    with a handful of values (six low outliers among 600 scores make the 1% quantile look like Student-t(5) in the
    modded-nanogpt log, whose 2% and 5% quantiles are Gaussian). While the 1% quantile cannot be read yet, the
    lowest height is taken: a few hundred values early in a run, while the noise scale is still settling,
    overstate the tails. Between the table's rows the log of the height is interpolated; beyond its ends, the end
    row holds.
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
