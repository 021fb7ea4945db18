"""Does an LR range test read differently later in a run? The byte-level LM of ``benchmarks/rescue.py``.

The LR search's range test runs at a run's first step. On this LM it reads the tuned peak poorly: its steepest
descent lies far below the tuned 1.5e-2 and its threshold far above, so the peak it places for a too-low run is
still too low. One explanation would be the untrained loss, which falls fast at almost any LR. This script trains
the LM at 0.1x its tuned peak (the ``lm_peak_x0.1`` row) for 0, 60 and 200 steps, then runs ``lr_guard.find_lr``
(60 steps, 1e-4 to 1) and prints the threshold, the steepest descent and the suggestion as multiples of the tuned
peak.

    python benchmarks/range_test_timing.py            # 2 seeds (~1 minute)
    python benchmarks/range_test_timing.py --seeds 3 --after 0 100 300
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rescue

from lr_guard import find_lr


def read_after(seed: int, after: int, multiple: float = 0.1) -> dict[str, float | None]:
    """The range test's readings, as multiples of the tuned peak, after ``after`` steps at ``multiple`` of it."""
    tuned = rescue.TUNED_PEAK["lm"]
    pl.seed_everything(seed, verbose=False)
    model = rescue.TinyLM(None, seed=seed, lr=multiple * tuned)
    rescue._quiet()
    with tempfile.TemporaryDirectory(prefix="lr_guard_range_timing_") as root:
        if after:
            rescue.quiet_trainer(root, after).fit(model)
        result = find_lr(rescue.quiet_trainer(root, 600), model, min_lr=1e-4, max_lr=1.0, num_steps=60)
    return {
        name: None if value is None else value / tuned
        for name, value in (
            ("threshold", result.threshold),
            ("steepest", result.steepest),
            ("suggestion", result.suggestion),
        )
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--after", type=int, nargs="+", default=[0, 60, 200], help="steps trained before the test")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("readings as multiples of the tuned peak (1.5e-2), after training at 0.1x of it")
    for seed in range(args.seeds):
        for after in args.after:
            read = read_after(seed, after)
            cells = "  ".join(f"{k} {'none' if v is None else f'{v:.2f}x'}" for k, v in read.items())
            print(f"seed {seed}, after {after:>4} steps: {cells}", flush=True)


if __name__ == "__main__":
    main()
