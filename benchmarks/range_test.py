"""The LR range test (``lr_guard.find_lr``) against a tuned LR and Lightning's ``lr_find``, on four tasks over seeds.

For each task and seed: one ``find_lr`` sweep and one ``Tuner.lr_find`` sweep (both 100 steps, 1e-5 to 10), then
full runs (the task's optimizer and schedule) started from each of: lr_guard's suggestion, the threshold x 1, 1/2,
1/3, 1/5 and 1/10, and Lightning's suggestion. The tuned reference: the same full runs at each LR of a log-spaced grid
(``--grid`` values from 10^0.5 x down to 10^-2.5 x the median threshold over the seeds: 3 decades), the same LR for
every seed; the tuned LR is the grid LR whose final loss has the lowest mean. For a schedule with a warm-up, the LR
tried is the schedule's peak. It prints the threshold, the suggestions, the final loss of each run (mean +- std over
the seeds), the tuned LR and each start's gap to the tuned run in % (mean +- std of the per-seed gaps: the seeds
are paired, each run against the tuned run of its own seed), all on the held-out loss (``run``, ``gap``) and on the
training loss (``train``, ``train gap``; tuned on its own), and last a verdict per task (:func:`verdict`).

    python benchmarks/range_test.py                  # 4 tasks x 3 seeds, about 10 minutes on one core
    python benchmarks/range_test.py --seeds 1 --steps 100 --grid 4   # a quick look

Tasks: ``regression`` (lr_guard.testing's TinyRegressionModule, SGD with momentum 0.9 and a cosine schedule, MSE on
the whole data set), ``digits`` (the demo's MLP on scikit-learn's digits, SGD with momentum 0.9 and a cosine
schedule, cross-entropy on the held-out images; needs scikit-learn), ``digits_adam`` (the same MLP with Adam, a
linear warm-up over the first tenth of the run and a cosine decay) and ``lm`` (the rescue benchmark's byte-level
transformer, AdamW, warm-up over the first tenth and cosine; loss on its held-out text).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
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

FRACTIONS = (1.0, 1 / 2, 1 / 3, 1 / 5, 1 / 10)
TASKS = ("regression", "digits", "digits_adam", "lm")


@functools.cache
def _rescue() -> Any:
    """The rescue benchmark's module (for its ``TinyLM``), loaded once from its file beside this one."""
    path = Path(__file__).resolve().parent / "rescue.py"
    spec = importlib.util.spec_from_file_location("lr_guard_rescue", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the rescue benchmark's TinyLM from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trainer(steps: int) -> pl.Trainer:
    _quiet()  # each time: a Lightning namespace imported lazily sets its logger's level as it loads
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
    if task == "digits":
        return demo.DigitsMLP(poison_step=None, lr=lr, optimizer="sgd", schedule="cosine", seed=seed)
    if task == "digits_adam":
        warmup = max(1, steps // 10)
        return demo.DigitsMLP(
            poison_step=None, lr=lr, optimizer="adam", schedule="warmup_cosine", warmup_steps=warmup, seed=seed
        )
    torch.manual_seed(seed)
    return _rescue().TinyLM(None, seed=seed, lr=lr)


@torch.no_grad()
def _final_losses(task: str, model: Any) -> tuple[float, float]:
    """The run's final loss on held-out data and on (a fixed part of) its training data."""
    if task == "regression":  # its whole data set is the training set: one number for both
        loss = float(model.full_loss())
        return loss, loss
    if task == "lm":
        return float(model._loss(model.val_windows)), float(model._loss(model.train_windows[: len(model.val_windows)]))
    held_out, train = (
        float(nn.functional.cross_entropy(model.net(x), y)) for x, y in (model.val_set.tensors, model.train_set.tensors)
    )
    return held_out, train


def _run(task: str, lr: float | None, seed: int, steps: int) -> tuple[float, float]:
    if lr is None or not math.isfinite(lr):
        return math.nan, math.nan
    model = _model(task, lr, seed, steps)
    _trainer(steps).fit(model)
    held_out, train = _final_losses(task, model)
    return (held_out if math.isfinite(held_out) else math.inf), (train if math.isfinite(train) else math.inf)


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


def _mean(values: list[float]) -> float:
    """The mean; infinite when a run was lost (diverged) or missing, so that it is never the tuned one."""
    return math.inf if any(math.isnan(v) for v in values) else statistics.mean(values)


def verdict(gaps: list[float]) -> str:
    """What the per-seed gaps to the tuned run say: within 1%, within noise (the mean gap no larger than the
    seeds' spread of it), or the gap."""
    if not all(math.isfinite(g) for g in gaps):
        return "runs lost"
    mean = statistics.mean(gaps)
    spread = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
    if mean <= 1.0:
        return "within 1%"
    return "within noise" if mean <= spread else f"{mean:+.1f}% above"


def sweep(task: str, seed: int, steps: int) -> dict[str, float]:
    """Both range tests on a fresh model: lr_guard's threshold and suggestion, and Lightning's suggestion."""
    torch.manual_seed(seed)
    result = find_lr(_trainer(steps), _model(task, 0.01, seed, steps), min_lr=1e-5, max_lr=10.0, num_steps=100)
    finder = Tuner(_trainer(steps)).lr_find(
        _model(task, 0.01, seed, steps), min_lr=1e-5, max_lr=10.0, num_training=100, update_attr=False
    )
    lightning = finder.suggestion() if finder is not None else None
    return {
        "threshold": result.threshold or math.nan,
        "steepest": result.steepest or math.nan,
        "suggestion": result.suggestion or math.nan,
        "lightning": lightning or math.nan,
    }


def _gaps(runs: list[float], tuned: list[float]) -> list[float]:
    """Each seed's run against the tuned run of the same seed, in % (a lost run: +inf)."""
    return [100 * (a / b - 1) if math.isfinite(a) else math.inf for a, b in zip(runs, tuned, strict=True)]


def measure(task: str, seeds: int, steps: int, grid: int) -> dict[str, list[float]]:
    """One task: the sweeps, the runs from their LRs and the grid, per seed; the tuned rows and the gaps, on the
    held-out loss (``run``, ``gap``) and on the training loss (``train``, ``train gap``)."""
    sweeps = [sweep(task, seed, steps) for seed in range(seeds)]
    columns: dict[str, list[float]] = {key: [s[key] for s in sweeps] for key in sweeps[0]}
    starts = {"suggestion": columns["suggestion"], "lightning": columns["lightning"]}
    starts.update({f"x{f:.2g}": [t * f for t in columns["threshold"]] for f in FRACTIONS})
    finals = {name: [_run(task, lr, seed, steps) for seed, lr in enumerate(lrs)] for name, lrs in starts.items()}
    thresholds = [t for t in columns["threshold"] if math.isfinite(t)]
    centre = statistics.median(thresholds) if thresholds else 0.1
    grid_lrs = [centre * 10 ** (0.5 - 3 * k / max(grid - 1, 1)) for k in range(grid)]
    grid_finals = {lr: [_run(task, lr, seed, steps) for seed in range(seeds)] for lr in grid_lrs}
    for metric, (run_key, gap_key) in enumerate((("run", "gap"), ("train", "train gap"))):
        for name in starts:
            columns[f"{run_key} {name}"] = [f[metric] for f in finals[name]]
        runs = {lr: [f[metric] for f in grid_finals[lr]] for lr in grid_lrs}
        for lr in grid_lrs:
            columns[f"{run_key} grid {lr:.3g}"] = runs[lr]
        tuned = min(grid_lrs, key=lambda lr: (_mean(runs[lr]), lr))
        columns[f"{run_key} tuned lr"] = [tuned] * seeds
        columns[f"{run_key} tuned"] = runs[tuned]
        for name in starts:
            columns[f"{gap_key} {name} %"] = _gaps(columns[f"{run_key} {name}"], runs[tuned])
    return columns


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of each full run")
    parser.add_argument("--grid", type=int, default=10, help="LRs of the tuned reference's grid (3 decades)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    args = parser.parse_args(argv)
    _quiet()
    torch.set_num_threads(1)
    table = {task: measure(task, args.seeds, args.steps, args.grid) for task in args.tasks}
    print(
        f"suggestion = {SUGGESTED_FRACTION:.2g} x threshold; final loss after {args.steps} steps, mean +- std; "
        "gap: to the tuned run of the same seed, in %"
    )
    for task, columns in table.items():
        print(f"\n{task} ({args.seeds} seeds)")
        for key, values in columns.items():
            print(f"  {key:<26} {_fmt(values)}")
    print("\nsuggestion and Lightning's against the tuned run (held-out loss; training loss)")
    for task, columns in table.items():
        cells = [
            f"{name} {verdict(columns[f'gap {name} %'])}; {verdict(columns[f'train gap {name} %'])}"
            for name in ("suggestion", "lightning")
        ]
        print(f"  {task:<12} " + " | ".join(cells))
    return table


if __name__ == "__main__":
    main()
