"""lr_guard's four detectors, at their defaults, on the seven real training-loss curves from public logs.

    python examples/real_curves.py          # all seven curves (a few seconds)
    python examples/real_curves.py --fast   # the short curves only

Each curve gets the defaults of its cadence: one value per epoch gets the per-validation defaults, as
``check_on="validation"`` picks them (``lr_guard.config.sized_detector(slot, "validation", None)``); a log of
every step or of every 100th step gets the constructors' defaults (the plateau detector's patience is a share of
the run at any cadence). For each curve it prints what a person labelled in it
(``lr_guard/data/curves/README.md``) and every event the detectors raise, with the step and the sentence the
guard would log.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence

from lr_guard import Event
from lr_guard.config import BUILT_IN_DETECTORS, sized_detector
from lr_guard.data import load_curve
from lr_guard.detectors import Detector

LABELS = {
    "lm_gpt2_124m_modded_muon_dataspike": "data spikes at 919, 947, 1760, 3194, 5335, 6127 that recover in 1-2 steps",
    "criteo_dlrm_warmup_divergence_inf_nan_algoperf": "bump at 6-11 that recovers; blows up at 71 (18.3), inf, NaN",
    "resnet110_cifar10_steplr_per_epoch": "per-epoch loss on a plateau over epochs 40-80; LR decay at 81",
    "ctc_conformer_stuck_plateau_algoperf": "every 100 steps; stuck from about step 1,000: a plateau soon after",
    "vit_imagenet_noisy_upper_tail_algoperf": "every 100 steps; healthy, with a long upper tail of noise: nothing",
    "lm_gpt2_124m_llmc_healthy": "healthy GPT-2 run: nothing to do while the loss falls",
    "lm_gpt2_124m_scaleshortcuts_spikes": "noisy 19k-step LM run, single-step spikes (14,221 the biggest); no plateau",
}
PER_EPOCH = {"resnet110_cifar10_steplr_per_epoch"}  # one value per epoch: the steps are epochs
FAST = [
    "lm_gpt2_124m_modded_muon_dataspike",
    "criteo_dlrm_warmup_divergence_inf_nan_algoperf",
    "resnet110_cifar10_steplr_per_epoch",
    "ctc_conformer_stuck_plateau_algoperf",
]


def detectors_for(name: str, series: Sequence[tuple[int, float]]) -> list[Detector]:
    """The four detectors at the defaults of the curve's cadence."""
    if name in PER_EPOCH:
        return [sized_detector(slot, "validation", None) or cls() for slot, cls in BUILT_IN_DETECTORS.items()]
    return [cls() for cls in BUILT_IN_DETECTORS.values()]


def run(name: str) -> list[Event]:
    series = load_curve(name)
    detectors = detectors_for(name, series)
    events = []
    for step, loss in series:
        for detector in detectors:
            event = detector.update(loss, step)
            if event is not None:
                events.append(event)
    return events


def main(argv: Sequence[str] | None = None) -> dict[str, list[Event]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="only the four short curves")
    args = parser.parse_args(argv)
    names = FAST if args.fast else list(LABELS)
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
