"""Detection benchmark: every detector over hundreds of labelled synthetic streams, at four cadences.

Prints precision, recall, F1, median detection delay, false positives per 10,000 clean values and the cost of one
update for each detector and cadence; the last line is one JSON object keyed by detector (the per-step suites),
with the other cadences under ``"cadences"``.

    python benchmarks/detection.py            # 120 streams per suite
    python benchmarks/detection.py --streams 20
    python benchmarks/detection.py --noise student_t6 student_t3 gaussian --detectors spike   # per noise family
    python benchmarks/detection.py --noise student_t3 --detectors spike --spike-tail-window 0   # fixed threshold
    python benchmarks/detection.py --noise student_t3 --detectors spike --spike-tail-window 0 --spike-threshold 35

``--noise``: the per-step suites are drawn once per noise family (``lr_guard.synthetic.NOISES``: Student-t(6),
the default's noise; Student-t(3), heavy tails; Gaussian; all at the same robust sigma), each with its own table
(under ``"by_noise"`` in the JSON). On heavier tails the injected spikes are higher, since the smallest is as high
as the noise itself reaches once in 100,000 steps. Without ``--noise`` the per-step suites use the default noise.

The cadences, each with the defaults the guard picks for it:

* per step: 3,000-step streams, one value per step; the constructors' defaults.
* per epoch: 150 values, each the mean over an epoch of 100 steps (``log_mean=True``); the per-validation
  defaults (``lr_guard.config.sized_detector(slot, "validation", None)``), as ``check_on="validation"`` uses.
* every 100 steps: 1,700 values, one step's loss every 100 steps of a 170,000-step run, as AlgoPerf logs; the
  constructors' defaults (the detectors alone; ``lr-guard replay`` divides the step counts of spike, oscillation
  and divergence by the spacing, and keeps the plateau detector's, whose patience is a share of the run).
* slow, heavy-tailed: 20,000 steps, one value per step, progress 20 times slower against Student-t(3) noise
  (``pace=0.05``), as a long LLM run at a constant LR; the constructors' defaults.

The per-epoch and sparse runs progress as a 3,000-step run does (``pace``), so their values are spaced along the
same curve; ``stuck`` is a run that never learns (labelled a plateau from the end of its warm-up). Delays and
false-positive rates count logged values (epochs, or values 100 steps apart).

Scoring: a true event counts as found when the detector raises an event of its kind inside the event's window.
Precision is over the detector's events on all labelled suites, where an event inside a window of another kind
that legitimately looks like its own (a spike at the start of a divergence or inside an oscillation; a plateau,
i.e. no improvement, during a divergence or an oscillation) is neither right nor wrong; every other event outside
a window of its own kind is a false positive. The clean suite gives false positives per 10,000 steps.
Stretches where the noise-free synthetic loss itself stopped improving (labelled
"natural" plateaus by ``lr_guard.synthetic``) are neutral for the plateau detector everywhere, clean streams
included. Delay = first detection step - window start.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from lr_guard.config import sized_detector
from lr_guard.detectors import (
    Detector,
    DivergenceDetector,
    OscillationDetector,
    PlateauDetector,
    SpikeDetector,
)
from lr_guard.events import EventKind
from lr_guard.synthetic import NOISES, LossStream, make_suite

DETECTORS: dict[str, type[Detector]] = {
    "spike": SpikeDetector,
    "oscillation": OscillationDetector,
    "plateau": PlateauDetector,
    "divergence": DivergenceDetector,
}
# Event kinds whose windows a detector may legitimately fire in without being right or wrong.
NEUTRAL = {
    "spike": {EventKind.DIVERGENCE, EventKind.OSCILLATION},
    "oscillation": set(),
    "plateau": {EventKind.DIVERGENCE, EventKind.OSCILLATION},  # neither improves: "no improvement" is true there
    "divergence": set(),
}


# name -> (make_suite options, injections, the default detector of a slot at that cadence)
CADENCES: dict[str, tuple[dict[str, Any], tuple[str | None, ...], Callable[[str], Detector]]] = {
    "per epoch": (
        {"n_steps": 15_000, "log_every": 100, "log_mean": True, "pace": 0.2},
        (None, "plateau", "stuck", "divergence"),
        lambda slot: sized_detector(slot, "validation", None) or DETECTORS[slot](**SETTINGS[slot]),
    ),
    "every 100 steps": (
        {"n_steps": 170_000, "log_every": 100, "pace": 3000 / 170_000},
        (None, "spike", "plateau", "stuck", "divergence"),
        lambda slot: DETECTORS[slot](**SETTINGS[slot]),
    ),
    "slow, heavy-tailed": (
        {"n_steps": 20_000, "pace": 0.05, "noise_df": 3.0},
        (None, "spike", "plateau", "divergence"),
        lambda slot: DETECTORS[slot](**SETTINGS[slot]),
    ),
}


SETTINGS: dict[str, dict[str, object]] = {name: {} for name in DETECTORS}  # constructor arguments (--spike-...)


def run_detector(make: Callable[[], Detector], stream: LossStream) -> tuple[list[int], float]:
    """Feed the stream; return the steps of the events and the seconds spent in ``update``."""
    detector = make()
    update = detector.update
    steps = []
    values = stream.values.tolist()
    t0 = time.perf_counter()
    for step, value in enumerate(values):
        if update(value, step) is not None:
            steps.append(step)
    return steps, time.perf_counter() - t0


def score(
    name: str, suites: dict[str | None, list[LossStream]], make: Callable[[], Detector] | None = None
) -> dict[str, float]:
    make = make or (lambda: DETECTORS[name](**SETTINGS[name]))
    kind = EventKind(name)
    tp_events = fp_events = found = total = 0
    delays: list[int] = []
    clean_fp = clean_steps = 0
    seconds = 0.0
    n_updates = 0
    for inject, streams in suites.items():
        for stream in streams:
            steps, spent = run_detector(make, stream)
            seconds += spent
            n_updates += len(stream)
            if inject is None:
                natural = [e for e in stream.events if e.kind == kind]
                clean_fp += sum(not any(e.start <= s <= e.end for e in natural) for s in steps)
                clean_steps += len(stream)
                continue
            own = [e for e in stream.events if e.kind == kind and e.detail != "natural"]
            neutral = [
                e for e in stream.events if e.kind in NEUTRAL[name] or (e.kind == kind and e.detail == "natural")
            ]
            for s in steps:
                if any(e.start <= s <= e.end for e in own):
                    tp_events += 1
                elif not any(e.start <= s <= e.end for e in neutral):
                    fp_events += 1
            for e in own:
                total += 1
                hits = [s for s in steps if e.start <= s <= e.end]
                if hits:
                    found += 1
                    delays.append(hits[0] - e.start)
    precision = tp_events / (tp_events + fp_events) if tp_events + fp_events else 0.0
    recall = found / total if total else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "median_delay_steps": float(statistics.median(delays)) if delays else float("nan"),
        "fp_per_10k_clean_steps": round(1e4 * clean_fp / clean_steps, 3),
        "us_per_update": round(1e6 * seconds / n_updates, 2),
        "true_events": total,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=120, help="streams per suite (default 120)")
    parser.add_argument("--steps", type=int, default=3000, help="steps per stream (default 3000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", nargs="+", choices=NOISES, default=None, help="per-step suites per noise family")
    parser.add_argument("--detectors", nargs="+", choices=list(DETECTORS), default=list(DETECTORS))
    parser.add_argument(
        "--spike-tail-window", type=int, default=None, help="SpikeDetector(tail_window=...) (0: a fixed threshold)"
    )
    parser.add_argument("--spike-threshold", type=float, default=None, help="SpikeDetector(threshold=...) (8)")
    args = parser.parse_args(argv)
    SETTINGS["spike"] = {} if args.spike_tail_window is None else {"tail_window": args.spike_tail_window}
    if args.spike_threshold is not None:
        SETTINGS["spike"]["threshold"] = args.spike_threshold
    if args.noise:
        return by_noise(args)
    suites = {
        inject: make_suite(inject, args.streams, seed=args.seed, n_steps=args.steps)
        for inject in (None, "spike", "oscillation", "plateau", "divergence", "stuck")
    }
    results: dict[str, Any] = {name: score(name, suites) for name in args.detectors}
    report(f"per step ({args.steps} steps)", suites, results, args.detectors)
    results["cadences"] = {}
    for cadence, (options, injections, default) in CADENCES.items():
        drawn = {inject: make_suite(inject, args.streams, seed=args.seed, **options) for inject in injections}
        figures = {
            name: score(name, drawn, lambda name=name, default=default: default(name)) for name in args.detectors
        }
        report(cadence, drawn, figures, args.detectors)
        results["cadences"][cadence] = figures
    print(json.dumps(results))
    return results


def by_noise(args: argparse.Namespace) -> dict[str, Any]:
    """The per-step suites once per noise family: one table each; the first family's results keyed by detector,
    with every family's under ``"by_noise"``."""
    families: dict[str, dict[str, Any]] = {}
    for noise in args.noise:
        suites = {
            inject: make_suite(inject, args.streams, seed=args.seed, n_steps=args.steps, noise=noise)
            for inject in (None, "spike", "oscillation", "plateau", "divergence")
        }
        families[noise] = {name: score(name, suites) for name in args.detectors}
        report(f"noise {noise}, per step ({args.steps} steps)", suites, families[noise], args.detectors)
    out: dict[str, Any] = {**families[args.noise[0]], "by_noise": families}
    print(json.dumps(out))
    return out


def report(
    cadence: str, suites: dict[str | None, list[LossStream]], results: dict[str, Any], names: Any = DETECTORS
) -> None:
    n_values = sum(len(s) for streams in suites.values() for s in streams)
    kinds = ", ".join(inject or "clean" for inject in suites)
    print(f"\n{cadence}: {sum(len(v) for v in suites.values())} streams, {n_values} values ({kinds})")
    header = (
        f"{'detector':<12}{'precision':>10}{'recall':>8}{'F1':>8}{'delay':>8}{'FP/10k':>9}{'us/upd':>8}{'events':>8}"
    )
    print(header)
    for name in names:
        r = results[name]
        print(
            f"{name:<12}{r['precision']:>10.3f}{r['recall']:>8.3f}{r['f1']:>8.3f}{r['median_delay_steps']:>8.1f}"
            f"{r['fp_per_10k_clean_steps']:>9.2f}{r['us_per_update']:>8.2f}{r['true_events']:>8}"
        )


if __name__ == "__main__":
    main()
