"""How well can a spike threshold learned from one stream do? Two measurements behind issue 19's spike F1 target.

1. How exact the threshold must be. The per-step suites of ``benchmarks/detection.py`` with a fixed threshold
   that knows the noise family (11 robust sigma for Student-t(6), 35 for Student-t(3): the best fixed ones), each
   stream's threshold multiplied by ``exp(sd * N(0, 1))``: the F1 a detector gets whose threshold is off by a
   log-normal error of that spread (three draws of the errors per spread).
2. How exact it can be. The height Student-t(df) noise reaches once in 100,000 draws, estimated by maximum
   likelihood of a Student-t (degrees of freedom and scale both fitted, the family known to be right) from ``n``
   draws: the spread (standard deviation of the log) of the estimate over 150 samples, from the lower half of
   the draws (the side a loss's upward outliers do not touch) and from both.

If the spread the data allow (2) is wider than the spread the target allows (1), no threshold learned from that
many values meets the target, however it is read.

    python benchmarks/spike_threshold_limits.py     # ~3 minutes
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from scipy import optimize, stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
import detection

from lr_guard.detectors import SpikeDetector
from lr_guard.synthetic import make_suite

BEST_FIXED = {"student_t6": 11.0, "student_t3": 35.0}
SPREADS = (0.0, 0.1, 0.2, 0.3)


def f1_with_threshold_error(noise: str, sd: float, draw: int) -> float:
    suites = {
        inject: make_suite(inject, 120, seed=0, n_steps=3000, noise=noise)
        for inject in (None, "spike", "oscillation", "plateau", "divergence")
    }
    rng = np.random.default_rng(draw)

    def make() -> SpikeDetector:
        return SpikeDetector(tail_window=0, threshold=BEST_FIXED[noise] * math.exp(sd * rng.standard_normal()))

    return detection.score("spike", suites, make)["f1"]


def mle_rare_height(distances: np.ndarray, rate: float = 1e-5) -> float:
    """The once-in-1/rate height of the Student-t whose |draws| best fit ``distances`` (df and scale fitted)."""

    def nll(p: np.ndarray) -> float:
        df, log_scale = math.exp(p[0]), p[1]
        return -float(np.sum(stats.t.logpdf(distances / math.exp(log_scale), df)) - len(distances) * log_scale)

    fit = optimize.minimize(nll, [math.log(5.0), math.log(float(np.median(distances)))], method="Nelder-Mead")
    df, scale = math.exp(fit.x[0]), math.exp(fit.x[1])
    return scale * float(stats.t.isf(rate, df))


def main() -> None:
    print("1. F1 of the best fixed threshold, off by a log-normal error of spread sd (three draws each)")
    for noise in BEST_FIXED:
        for sd in SPREADS:
            f1s = [f1_with_threshold_error(noise, sd, draw) for draw in range(3 if sd else 1)]
            print(f"   {noise:<11} sd {sd:.1f}: F1 {' '.join(f'{f:.3f}' for f in f1s)}", flush=True)
    print("2. spread (sd of log) of the maximum-likelihood once-in-100,000 height from n Student-t draws")
    rng = np.random.default_rng(0)
    for df in (6.0, 3.0):
        true = float(stats.t.isf(1e-5, df))
        for n in (500, 2000):
            for side in ("lower half", "both sides"):
                logs = []
                for _ in range(150):
                    x = rng.standard_t(df, n)
                    distances = -x[x < 0] if side == "lower half" else np.abs(x)
                    logs.append(math.log(mle_rare_height(distances) / true))
                print(f"   t({df:g}) n={n:<5} {side}: sd {np.std(logs):.2f}, median {math.exp(np.median(logs)):.2f}x")


if __name__ == "__main__":
    main()
