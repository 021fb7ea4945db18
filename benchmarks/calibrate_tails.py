"""Calibrate the spike detector's heavy-tail table: how the tails of its *scores* look on Student-t noise.

:func:`lr_guard.detectors.tails.rare_height` reads the shape of a stream's noise off the lower tail of the spike
detector's scores and maps it to the height those scores reach once in ``1 / RARE_RATE`` values (33,000). The
scores are not the noise draws themselves: each is a draw less a trend that carries the last draws (an EMA), divided
by a noise scale that moves with them (an EMA of clipped first differences), less the scores' own centre. That
lightens the middle of the distribution more than its far tail, so a table of one Student-t draw's quantiles reads
Student-t(3) scores as Student-t(3.5) (their lower 1% quantile is 5.42 quartiles from the median; one t(3) draw's is
5.94, one t(3.5) draw's 5.41) and puts their rare height at 31 quartiles where it is 39 (20% low). This script feeds
long stationary streams of Student-t(df) noise, for each ``df`` of the table, through an exact vectorised copy of the
detector's score recursion (:func:`scores`, checked against ``SpikeDetector`` by ``tests/test_detectors.py``) and
prints the table (``lr_guard.detectors.tails.SCORE_TAILS``): the lower 1%, 2% and 5% quantiles' distances from the
median and the upper once-in-``1 / RARE_RATE`` height above it, each in units of the lower quartile's distance.

    python benchmarks/calibrate_tails.py                 # 4e7 scores per row (~5 minutes)
    python benchmarks/calibrate_tails.py --scores 4e6    # a quick look
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from lr_guard.detectors import SpikeDetector
from lr_guard.detectors.base import NoiseScale
from lr_guard.detectors.tails import RARE_RATE, SCORE_TAILS, TAIL_PROBS

DFS = tuple(row[0] for row in SCORE_TAILS)
BURN_IN = 1000  # values per stream before its scores count (the scale and the centre settle)


def scores(
    y: np.ndarray,
    rare: float = math.inf,
    detector: SpikeDetector | None = None,
) -> np.ndarray:
    """The scores less their centre that ``detector`` (default: ``SpikeDetector()``) gives streams of log-losses
    ``y`` (shape: steps x streams) while its threshold stands at ``rare`` above the centre (from its
    ``threshold`` to ``TAIL_CAP`` times that): the same recursion, excursions and rebasing included, every stream
    at once. NaN for the values it keeps no score of (its first value, and the rest of an excursion after the
    value that began it)."""
    det = detector or SpikeDetector()
    a_trend, a_noise, clip, a_centre = det.trend_alpha, det.noise_alpha, det.clip, det.CENTRE_ALPHA
    n_steps, n_streams = y.shape
    out = np.full((n_steps, n_streams), np.nan)
    trend = y[0].copy()
    prev = y[0].copy()
    mean = np.zeros(n_streams)
    weight = np.zeros(n_streams)
    count = np.zeros(n_streams, dtype=np.int64)  # differences the noise scale has taken in
    centre = np.zeros(n_streams)
    excursion = np.zeros(n_streams, dtype=np.int64)
    for t in range(1, n_steps):
        yt = y[t]
        with np.errstate(divide="ignore", invalid="ignore"):
            sigma = np.where(weight > 0.0, 0.886 * mean / weight, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(sigma > 0.0, (yt - trend) / sigma, np.where(yt > trend, np.inf, 0.0))
        ordinary = excursion == 0
        out[t] = np.where(ordinary, z - centre, np.nan)
        level = np.clip(centre + rare, det.threshold, det.TAIL_CAP * det.threshold)
        going = ~ordinary
        excursion = np.where(going, excursion + 1, excursion)
        ended = going & (z < 0.5 * det.threshold)
        rebased = going & ~ended & (excursion > det.rebase_steps)
        excursion = np.where(ended | rebased, 0, excursion)
        began = ordinary & (t >= det.warmup_steps) & (z >= level)
        excursion = np.where(began, 1, excursion)
        taken = ordinary & ~began & (sigma > 0.0) & (t >= det.TAIL_INTAKE)
        centre = np.where(taken, a_centre * centre + (1.0 - a_centre) * np.clip(z, -clip, clip), centre)
        y_clipped = np.minimum(yt, trend + clip * sigma) if t >= det.warmup_steps else yt
        abs_diff = np.abs(y_clipped - prev)
        with np.errstate(divide="ignore", invalid="ignore"):
            abs_diff = np.where(count >= NoiseScale.MIN_COUNT, np.minimum(abs_diff, clip * mean / weight), abs_diff)
        # a rebased excursion takes its value as the trend and skips the statistics' update
        mean = np.where(rebased, mean, a_noise * mean + (1.0 - a_noise) * abs_diff)
        trend = np.where(rebased, yt, a_trend * trend + (1.0 - a_trend) * y_clipped)
        prev = np.where(rebased, yt, y_clipped)
        weight = np.where(rebased, weight, a_noise * weight + (1.0 - a_noise))
        count = np.where(rebased, count, count + 1)
    return out


def draws(rng: np.random.Generator, df: float, shape: tuple[int, int]) -> np.ndarray:
    """Student-t(``df``) draws (Gaussian for ``inf``)."""
    return rng.standard_normal(shape) if math.isinf(df) else rng.standard_t(df, shape)


def shape_of(
    df: float, n_scores: float, seed: int = 0, streams: int = 20_000, rate: float = RARE_RATE
) -> tuple[float, ...]:
    """(1%, 2%, 5% lower quantile, once-in-1/RARE_RATE upper height), each from the median in lower quartiles, of
    the scores of about ``n_scores`` values of stationary Student-t(``df``) noise (0.02 nats per unit draw). The
    detector's threshold is set where the height is (its excursions leave values out of the scores): first at its
    cap, then at the height that run found."""
    rng = np.random.default_rng(seed)
    steps = BURN_IN + max(1, math.ceil(n_scores / streams))
    y = 0.02 * draws(rng, df, (steps, streams))
    rare = math.inf
    for _ in range(2):
        kept = scores(y, rare)[BURN_IN:].ravel()
        kept = kept[np.isfinite(kept)]
        centre = float(np.median(kept))
        quartile = centre - float(np.quantile(kept, 0.25))
        lower = [(centre - float(np.quantile(kept, p))) / quartile for p in TAIL_PROBS]
        rare = float(np.quantile(kept, 1.0 - rate)) - centre
    return (*lower, rare / quartile)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", type=float, default=4e7, help="scores per row (default 4e7)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=float, default=RARE_RATE, help=f"the rare height's rate (default {RARE_RATE:g})")
    args = parser.parse_args(argv)
    print(f"# (df, {', '.join(f'lower {p:g}' for p in TAIL_PROBS)}, upper {args.rate:g}) in lower quartiles")
    for df in DFS:
        t0 = time.perf_counter()
        row = shape_of(df, args.scores, args.seed, rate=args.rate)
        print(f"    ({df}, {', '.join(f'{v:.4f}' for v in row)}),  # {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
