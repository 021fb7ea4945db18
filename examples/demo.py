"""The lr_guard demo: one poisoned batch kills a run; LRGuard() rescues it.

A small MLP learns scikit-learn's bundled handwritten digits (1,797 images, shipped inside scikit-learn, no
download). Halfway through, one training batch arrives corrupted (NaN pixels, as a broken data shard or a
bad augmentation produces). The run is trained twice from the same seed:

* without a guard: the NaN reaches the weights and the run is dead;
* with ``LRGuard()``: the guard's update gate sees the NaN loss and gradient before the update lands and skips
  that one update exactly (weights and optimizer state untouched); training carries on and ends where the run
  without the fault ends. A fault the gate lets through (a lasting blow-up) is rolled back in place to the last
  healthy snapshot instead.

A third run without the fault shows what the run would have reached.

    python examples/demo.py            # a few seconds on a CPU
    python examples/demo.py --fast     # fewer steps (used by the tests)

Both runs log to TensorBoard; the command to look at them is printed at the end.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lr_guard import LRGuard


def digits() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    train, val = order[:1500], order[1500:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


class DigitsMLP(pl.LightningModule):
    """An MLP on the digits. ``fault``: ``"nan"`` (NaN pixels) or ``"huge"`` (pixels x 1e6) at ``poison_step``;
    ``schedule``: ``"cosine"``, ``"warmup_cosine"`` (linear warm-up over ``warmup_steps``) or ``"constant"``."""

    def __init__(
        self,
        poison_step: int | None,
        lr: float = 3e-3,
        optimizer: str = "adam",
        schedule: str = "cosine",
        fault: str = "nan",
        batch_size: int = 32,
        warmup_steps: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        self.poison_step, self.lr, self.optimizer_name, self.schedule = poison_step, lr, optimizer, schedule
        self.fault, self.batch_size, self.warmup_steps, self.seed = fault, batch_size, warmup_steps, seed
        self.train_set, self.val_set = digits()
        self.extra_schedulers: list[Any] = []  # (factory, config) pairs a benchmark adds, e.g. ReduceLROnPlateau

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step == self.poison_step:
            x = torch.full_like(x, math.nan) if self.fault == "nan" else x * 1e6  # the corrupted batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, generator=torch.Generator().manual_seed(self.seed)
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=297)

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "adam":
            optimizer: torch.optim.Optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        else:
            optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        steps = self.trainer.max_steps
        S = torch.optim.lr_scheduler
        if self.schedule == "cosine":
            main = S.CosineAnnealingLR(optimizer, steps)
        elif self.schedule == "warmup_cosine":
            main = S.SequentialLR(
                optimizer,
                [
                    S.LinearLR(optimizer, 0.01, 1.0, self.warmup_steps),
                    S.CosineAnnealingLR(optimizer, steps - self.warmup_steps),
                ],
                [self.warmup_steps],
            )
        else:
            main = S.LambdaLR(optimizer, lambda _: 1.0)
        configs = [{"scheduler": main, "interval": "step"}]
        configs += [{"scheduler": factory(optimizer), **config} for factory, config in self.extra_schedulers]
        return [optimizer], configs


def train(name: str, guard: LRGuard | None, steps: int, poison_step: int, logdir: str) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    model = DigitsMLP(poison_step)
    trainer = pl.Trainer(
        max_steps=steps,
        val_check_interval=steps // 4,
        check_val_every_n_epoch=None,
        callbacks=[guard] if guard else [],
        logger=pl.loggers.TensorBoardLogger(logdir, name=name),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        log_every_n_steps=10,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model)
    metrics = trainer.validate(model, verbose=False)[0]
    return {
        "val_loss": metrics["val_loss"],
        "val_acc": metrics["val_acc"],
        "seconds": time.perf_counter() - start,
        "finite": all(torch.isfinite(p).all() for p in model.parameters()),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="fewer steps (for tests)")
    parser.add_argument("--logdir", default=None, help="TensorBoard log directory (default: a temporary one)")
    args = parser.parse_args(argv)
    steps = 240 if args.fast else 800
    poison = steps // 2
    logdir = args.logdir or os.path.join(tempfile.gettempdir(), "lr_guard_demo")
    if args.logdir is None:  # the demo's own folder: this run's three runs only, not those of earlier demos
        shutil.rmtree(logdir, ignore_errors=True)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "lightning_utilities"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("lr_guard").setLevel(logging.ERROR)  # the decisions are printed below instead

    print(f"Training a digits MLP for {steps} steps; batch {poison} is poisoned with NaN.\n")
    without = train("without_guard", None, steps, poison, logdir)
    guard = LRGuard()
    with_guard = train("with_lr_guard", guard, steps, poison, logdir)
    reference = train("no_fault", None, steps, -1, logdir)

    def show(x: float) -> str:
        return f"{x:.4f}" if math.isfinite(x) else "nan (run lost)"

    runs = (without, with_guard, reference)
    print(f"{'':28}{'without a guard':>18}{'with LRGuard()':>18}{'(no fault)':>14}")
    print(
        f"{'final validation loss':28}"
        + "".join(f"{show(r['val_loss']):>{w}}" for r, w in zip(runs, (18, 18, 14), strict=True))
    )
    print(
        f"{'final validation accuracy':28}"
        + "".join(f"{r['val_acc']:>{w}.3f}" for r, w in zip(runs, (18, 18, 14), strict=True))
    )
    print(f"{'weights finite':28}" + "".join(f"{r['finite']!s:>{w}}" for r, w in zip(runs, (18, 18, 14), strict=True)))
    print(f"{'wall time (s)':28}" + "".join(f"{r['seconds']:>{w}.1f}" for r, w in zip(runs, (18, 18, 14), strict=True)))
    print("\nWhat the guard did:")
    for decision in guard.decisions:
        print(f"  {decision.message}")
    if not guard.decisions:
        print("  nothing")
    print(f"\nLook at both runs:  tensorboard --logdir {logdir}")
    return {
        "without_guard": without,
        "with_lr_guard": with_guard,
        "no_fault": reference,
        "decisions": {"list": guard.decisions},
    }


if __name__ == "__main__":
    main()
