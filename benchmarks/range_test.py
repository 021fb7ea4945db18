"""The LR range test (``lr_guard.find_lr``) against Lightning's ``lr_find``, on two tasks over seeds.

For each task and seed: one ``find_lr`` sweep and one ``Tuner.lr_find`` sweep (both 100 steps, 1e-5 to 10), then a
short full run (SGD with momentum 0.9, cosine schedule) started from each of: the threshold x 1, 1/2, 1/3 and
1/10 (lr_guard's suggestion is ``SUGGESTED_FRACTION`` of it) and Lightning's suggestion. It prints the threshold,
the suggestions and the final loss of each run, mean +- std over the seeds.

    python benchmarks/range_test.py                  # 2 tasks x 3 seeds, about 2 minutes on one core
    python benchmarks/range_test.py --seeds 1 --steps 100   # a quick look

Tasks: ``regression`` (lr_guard.testing's TinyRegressionModule, MSE on the whole data set) and ``digits`` (the
demo's MLP on scikit-learn's digits, cross-entropy on the held-out images; needs scikit-learn).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.tuner import Tuner
from torch import nn

from lr_guard import find_lr
from lr_guard.range_test import SUGGESTED_FRACTION
from lr_guard.testing import TinyRegressionModule

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import demo

FRACTIONS = (1.0, 1 / 2, 1 / 3, 1 / 10)


def _trainer(steps: int) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=tempfile.mkdtemp(prefix="lr_guard_range_"),
    )


def _model(task: str, lr: float, seed: int, steps: int) -> pl.LightningModule:
    if task == "regression":
        return TinyRegressionModule(
            lr=lr, batch_size=64, seed=seed, scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, steps)
        )
    return demo.DigitsMLP(poison_step=None, lr=lr, optimizer="sgd", schedule="cosine", seed=seed)


@torch.no_grad()
def _final_loss(task: str, model: Any) -> float:
    if task == "regression":
        return float(model.full_loss())
    x, y = model.val_set.tensors
    return float(nn.functional.cross_entropy(model.net(x), y))


def _run(task: str, lr: float | None, seed: int, steps: int) -> float:
    if lr is None:
        return math.nan
    model = _model(task, lr, seed, steps)
    _trainer(steps).fit(model)
    loss = _final_loss(task, model)
    return loss if math.isfinite(loss) else math.inf


def _quiet() -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")  # Lightning's lr_find draws its own progress bar
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _fmt(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "n/a"
    lost = len(values) - len(finite)
    spread = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return f"{statistics.mean(finite):.4g} +- {spread:.2g}" + (f" ({lost} lost)" if lost else "")


def measure(task: str, seed: int, steps: int) -> dict[str, float]:
    torch.manual_seed(seed)
    result = find_lr(_trainer(steps), _model(task, 0.01, seed, steps), min_lr=1e-5, max_lr=10.0, num_steps=100)
    finder = Tuner(_trainer(steps)).lr_find(
        _model(task, 0.01, seed, steps), min_lr=1e-5, max_lr=10.0, num_training=100, update_attr=False
    )
    lightning = finder.suggestion() if finder is not None else None
    row: dict[str, float] = {
        "threshold": result.threshold or math.nan,
        "suggestion": result.suggestion or math.nan,
        "lightning": lightning or math.nan,
    }
    for fraction in FRACTIONS:
        lr = None if result.threshold is None else result.threshold * fraction
        row[f"run x{fraction:.2g}"] = _run(task, lr, seed, steps)
    row["run lightning"] = _run(task, lightning, seed, steps)
    return row


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of each full run")
    parser.add_argument("--tasks", nargs="+", default=["regression", "digits"])
    args = parser.parse_args(argv)
    _quiet()
    torch.set_num_threads(1)
    table: dict[str, dict[str, list[float]]] = {}
    for task in args.tasks:
        rows = [measure(task, seed, args.steps) for seed in range(args.seeds)]
        table[task] = {key: [r[key] for r in rows] for key in rows[0]}
    print(f"suggestion = {SUGGESTED_FRACTION:.2g} x threshold; final loss after {args.steps} steps, mean +- std")
    for task, columns in table.items():
        print(f"\n{task} ({args.seeds} seeds)")
        for key, values in columns.items():
            print(f"  {key:<16} {_fmt(values)}")
    return table


if __name__ == "__main__":
    main()
