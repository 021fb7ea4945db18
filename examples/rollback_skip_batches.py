"""Rollback on divergence with batch skipping, as large-model teams do by hand.

A stretch of bad data (steps 200-204 of the run, NaN inputs) hits a small regression model. ``DivergenceRollback``
restores the last confirmed-good state in place, halves the LR and skips the next 10 batches, so the bad stretch is
not learned from; training goes on and ends finite.

    python examples/rollback_skip_batches.py [--fast]
"""

from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl

from lr_guard import DivergenceRollback
from lr_guard.testing import TinyRegressionModule


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lr_guard").setLevel(logging.ERROR)  # the decisions are printed below
    steps = 300 if args.fast else 1000
    bad = range(200, 205)
    results = {}
    for name, callbacks in (("without", []), ("with DivergenceRollback", [DivergenceRollback(skip_batches=10)])):
        module = TinyRegressionModule(lr=0.05, poison_steps=bad)
        pl.Trainer(
            max_steps=steps,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(module)
        results[name] = module.full_loss()
        print(f"{name:>26}: final loss {results[name]:.4f}")
        for guard in callbacks:
            for d in guard.decisions:
                print(f"{'':>28}{d.message}")
    return results


if __name__ == "__main__":
    main()
