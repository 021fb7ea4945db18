"""``lr-guard replay`` on a finished run: train without a guard, then ask what lr_guard would have done.

    python examples/replay_finished_run.py [--fast]

Equivalent on the command line:  lr-guard replay <log dir> --set skip_batches=5 --tensorboard
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

from lr_guard.replay import main as replay_main
from lr_guard.testing import ScriptedLossModule


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--logdir", default=None, help="TensorBoard log directory (default: a fresh one per run)")
    args = parser.parse_args(argv)
    args.logdir = args.logdir or tempfile.mkdtemp(prefix="lr_guard_replay_example_")  # one run, not one per call
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    steps = 150 if args.fast else 600
    script = [2.0 / (1.0 + 0.03 * t) for t in range(steps)]
    script[steps // 2] = math.nan  # the run that went wrong
    logger = pl.loggers.TensorBoardLogger(args.logdir, name="finished")
    pl.Trainer(
        max_steps=steps,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(ScriptedLossModule(script, optimizer="adam", lr=0.01))
    print(f"A finished run without a guard, logged to {logger.log_dir}. What would lr_guard have done?\n")
    code = replay_main(
        ["replay", logger.log_dir, "--set", "skip_batches=5", "--set", "snapshot_every=20", "--tensorboard"]
    )
    return {"exit_code": code, "log_dir": logger.log_dir}


if __name__ == "__main__":
    main()
