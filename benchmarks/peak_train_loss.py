"""The digits MLP's peak-LR sweep read on the training images as well as on the held-out ones.

The guard reads the training loss. Where a higher peak ends lower on the training images but higher on the
held-out ones (the MLP overfits: 600 steps are six epochs over 1,500 images), nothing the guard sees says the peak is
too high. This prints, for each peak of ``benchmarks/rescue.py``'s sweep, the final cross-entropy on the held-out
images and on the whole training set, mean +- std over the seeds, with no guard.

    python benchmarks/peak_train_loss.py                      # peaks 1x, 3x, 10x the tuned peak, 3 seeds
    python benchmarks/peak_train_loss.py --multiples 0.3 1 3 --seeds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import demo
import rescue


def final_losses(multiple: float, seed: int, steps: int) -> tuple[float, float]:
    """(held-out, training) cross-entropy at the end of the no-guard run at ``multiple`` x the tuned peak."""
    kwargs = dict(rescue.SCENARIOS[f"mlp_peak_x{multiple:g}"])
    kwargs.pop("model", None)
    pl.seed_everything(seed, verbose=False)
    model = demo.DigitsMLP(None, seed=seed, **kwargs)
    rescue._quiet()
    with tempfile.TemporaryDirectory(prefix="lr_guard_peak_") as root:
        trainer = rescue.quiet_trainer(root, steps)
        trainer.fit(model)
        held_out = trainer.validate(model, verbose=False)[0]["val_loss"]
    x, y = model.train_set.tensors
    with torch.no_grad():
        training = torch.nn.functional.cross_entropy(model.net(x), y).item()
    return float(held_out), training


def main(argv: list[str] | None = None) -> dict[float, tuple[float, float]]:
    """Print the table; return ``{multiple: (mean held-out loss, mean training loss)}``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--multiples", type=float, nargs="+", default=[1.0, 3.0, 10.0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{'peak':>8} {'held-out loss':>18} {'training loss':>20}")
    means = {}
    for multiple in args.multiples:
        runs = [final_losses(multiple, seed, args.steps) for seed in range(args.seeds)]
        cells = []
        for values in zip(*runs, strict=True):
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} ± {spread:.4f}")
        print(f"{multiple:>7g}x {cells[0]:>18} {cells[1]:>20}")
        means[multiple] = (statistics.mean(r[0] for r in runs), statistics.mean(r[1] for r in runs))
    return means


if __name__ == "__main__":
    main()
