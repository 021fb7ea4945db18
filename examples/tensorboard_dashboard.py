"""The guard's TensorBoard dashboard: a run with a data spike (its update skipped by the gate), a plateau cut, a
NaN batch (skipped), and a blow-up that lasts (the gate lets it through after 3 skips in a row; rolled back).

    python examples/tensorboard_dashboard.py [--fast] [--logdir DIR]    # default DIR: a fresh folder per run
    tensorboard --logdir DIR      # then: Custom Scalars -> lr_guard; Text -> lr_guard/decisions

Scalars: the loss with its trend and the spike alarm level, each detector's score beside its threshold, the
learning rate and the guard's factor, and counters. Text: one markdown entry per decision, all decisions as one
table, and the configuration.
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl

from lr_guard import LRGuard, PlateauDetector
from lr_guard.testing import ScriptedLossModule


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--logdir", default=None, help="TensorBoard log directory (default: a fresh one per run)")
    args = parser.parse_args(argv)
    args.logdir = args.logdir or tempfile.mkdtemp(prefix="lr_guard_dashboard_")  # no runs of earlier calls to overlay
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lr_guard").setLevel(logging.ERROR)  # the decisions are printed below
    steps = 400 if args.fast else 1500
    script = [2.0 / (1.0 + 0.02 * t) * (1 + 0.02 * math.sin(1.7 * t)) for t in range(steps)]
    script[steps // 4] *= 3.0  # a data spike
    for t in range(steps // 2, 3 * steps // 4):  # a plateau
        script[t] = script[steps // 2 - 1] * (1 + 0.02 * math.sin(1.7 * t))
    script[3 * steps // 4] = math.nan  # a NaN batch
    blow_up = 3 * steps // 4 + 20
    script[blow_up : blow_up + 8] = [20 * script[blow_up]] * 8  # a blow-up that lasts
    guard = LRGuard(plateau=PlateauDetector(patience=steps // 10, window=20, warmup_steps=0))
    logger = pl.loggers.TensorBoardLogger(args.logdir, name="dashboard")
    print(
        f"Training {steps} steps with LRGuard (a spike, a plateau, a NaN, a blow-up), logging to {logger.log_dir} ...",
        flush=True,
    )
    pl.Trainer(
        max_steps=steps,
        callbacks=[guard],
        logger=logger,
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(ScriptedLossModule(script, optimizer="adam", lr=0.01))
    for d in guard.decisions:
        print(d.message)
    print(f"\nEvent files in {logger.log_dir}\nLook at them:  tensorboard --logdir {args.logdir}")
    return {"decisions": guard.decisions, "log_dir": logger.log_dir}


if __name__ == "__main__":
    main()
