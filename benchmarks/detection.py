"""Detection benchmark: every detector over hundreds of labelled synthetic streams.

Prints precision, recall, F1, median detection delay, false positives per 10,000 clean steps and the cost of one
update for each detector; the last line is one JSON object keyed by detector.

    python benchmarks/detection.py            # 120 streams per suite, 3 noise families (1,800 streams, 5.4M steps)
    python benchmarks/detection.py --streams 20 --noise student_t3 --detectors spike

Each noise family (``lr_guard.synthetic.NOISES``: Student-t(6), the default; Student-t(3), heavy tails;
Gaussian; all at the same robust sigma) gets its own five suites and its own table. On heavier tails the
injected spikes are higher, since the smallest is as high as the noise itself reaches once in 100,000 steps.

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


SETTINGS: dict[str, dict[str, object]] = {name: {} for name in DETECTORS}  # constructor arguments (--spike-...)


def run_detector(cls: type[Detector], stream: LossStream) -> tuple[list[int], float]:
    """Feed the stream; return the steps of the events and the seconds spent in ``update``."""
    detector = cls(**SETTINGS[EventKind(cls.kind).value])
    update = detector.update
    steps = []
    values = stream.values.tolist()
    t0 = time.perf_counter()
    for step, value in enumerate(values):
        if update(value, step) is not None:
            steps.append(step)
    return steps, time.perf_counter() - t0


def score(name: str, suites: dict[str | None, list[LossStream]]) -> dict[str, float]:
    cls = DETECTORS[name]
    kind = EventKind(name)
    tp_events = fp_events = found = total = 0
    delays: list[int] = []
    clean_fp = clean_steps = 0
    seconds = 0.0
    n_updates = 0
    for inject, streams in suites.items():
        for stream in streams:
            steps, spent = run_detector(cls, stream)
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


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Print one table per noise family; return (and print as JSON) the first family's results keyed by detector,
    with every family's under ``"by_noise"``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=120, help="streams per suite (default 120)")
    parser.add_argument("--steps", type=int, default=3000, help="steps per stream (default 3000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", nargs="+", choices=NOISES, default=list(NOISES), help="noise families (all)")
    parser.add_argument("--detectors", nargs="+", choices=list(DETECTORS), default=list(DETECTORS))
    parser.add_argument("--spike-tail-window", type=int, default=0, help="SpikeDetector(tail_window=...) (0)")
    args = parser.parse_args(argv)
    SETTINGS["spike"] = {"tail_window": args.spike_tail_window} if args.spike_tail_window else {}
    by_noise: dict[str, dict[str, dict[str, float]]] = {}
    for noise in args.noise:
        suites = {
            inject: make_suite(inject, args.streams, seed=args.seed, n_steps=args.steps, noise=noise)
            for inject in (None, "spike", "oscillation", "plateau", "divergence")
        }
        n_total = sum(len(s) for streams in suites.values() for s in streams)
        print(
            f"noise {noise}: {sum(len(v) for v in suites.values())} streams, {n_total} steps "
            f"({args.streams} per suite: clean, spike, oscillation, plateau, divergence)"
        )
        results = {name: score(name, suites) for name in args.detectors}
        header = (
            f"{'detector':<12}{'precision':>10}{'recall':>8}{'F1':>8}{'delay':>8}{'FP/10k':>9}{'us/upd':>8}"
            f"{'events':>8}"
        )
        print(header)
        for name, r in results.items():
            print(
                f"{name:<12}{r['precision']:>10.3f}{r['recall']:>8.3f}{r['f1']:>8.3f}{r['median_delay_steps']:>8.1f}"
                f"{r['fp_per_10k_clean_steps']:>9.2f}{r['us_per_update']:>8.2f}{r['true_events']:>8}"
            )
        by_noise[noise] = results
    out: dict = {**by_noise[args.noise[0]], "by_noise": by_noise}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
