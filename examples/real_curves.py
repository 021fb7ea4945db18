"""lr_guard's four detectors on four real training-loss curves from public logs.

    python examples/real_curves.py          # all four curves (about 2 s)
    python examples/real_curves.py --fast   # the short curves only

For each curve it prints what a person labelled in it and every event the detectors raise, with the step and the
sentence the guard would log.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence

from lr_guard import DivergenceDetector, Event, OscillationDetector, PlateauDetector, SpikeDetector
from lr_guard.data import load_curve

LABELS = {
    "lm_gpt2_124m_modded_muon_dataspike": "data spikes at 919, 947, 1760, 3194, 5335, 6127 that recover in 1-2 steps",
    "criteo_dlrm_warmup_divergence_inf_nan_algoperf": "bump at 6-11 that recovers; blows up at 71 (18.3), inf, NaN",
    "resnet110_cifar10_steplr_per_epoch": "per-epoch loss on a plateau over epochs 40-80; LR decay at 81",
    "lm_gpt2_124m_llmc_healthy": "healthy GPT-2 run: nothing to do while the loss falls",
}


def detectors_for(name: str) -> list:
    if name.startswith("resnet"):  # one value per epoch: torch's rule, patience 5, rel 1e-2
        return [PlateauDetector(patience=5, threshold=1e-2, window=1, noise_sigmas=0.0, warmup_steps=0)]
    return [SpikeDetector(), OscillationDetector(), PlateauDetector(), DivergenceDetector()]


def run(name: str) -> list[Event]:
    detectors = detectors_for(name)
    events = []
    for step, loss in load_curve(name):
        for detector in detectors:
            event = detector.update(loss, step)
            if event is not None:
                events.append(event)
    return events


def main(argv: Sequence[str] | None = None) -> dict[str, list[Event]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="only the two short curves")
    args = parser.parse_args(argv)
    names = list(LABELS)[:3] if args.fast else list(LABELS)
    found = {}
    warnings.simplefilter("ignore")
    for name in names:
        events = run(name)
        found[name] = events
        print(f"\n{name}\n  labelled: {LABELS[name]}\n  lr_guard: {len(events)} event(s)")
        for event in events:
            print(f"    [{event.kind.value:<10}] {event.message}")
    return found


if __name__ == "__main__":
    main()
