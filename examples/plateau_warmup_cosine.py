"""Reduce-on-plateau beside a warm-up + cosine schedule.

The run warms up linearly, then follows a cosine schedule (SequentialLR). Its loss stalls on a noise floor
halfway. ``PlateauLRReducer`` (torch's ReduceLROnPlateau, noise-aware and per step) halves the LR there; the cut
composes with the schedule -- every later LR is 0.5 x what the schedule alone gives -- and no cut is made while
the warm-up is still raising the LR.

    python examples/plateau_warmup_cosine.py [--fast]
"""

from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch.optim import lr_scheduler as S

from lr_guard import PlateauDetector, PlateauLRReducer
from lr_guard.testing import ScriptedLossModule


class LRLog(pl.Callback):
    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
        self.lrs[trainer.global_step] = optimizer.param_groups[0]["lr"]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lr_guard").setLevel(logging.ERROR)  # the decisions are printed below
    steps = 300 if args.fast else 1200
    # a loss that falls, then stalls at step steps/2 (a scripted loss with real gradients)
    script = [2.0 / (1.0 + 0.02 * t) for t in range(steps // 2)] + [2.0 / (1.0 + 0.01 * steps)] * steps

    def schedule(opt: torch.optim.Optimizer) -> Any:
        warmup = steps // 10
        return S.SequentialLR(
            opt, [S.LinearLR(opt, 0.01, 1.0, warmup), S.CosineAnnealingLR(opt, steps - warmup)], [warmup]
        )

    def train(callbacks: list[Any]) -> LRLog:
        log = LRLog()
        module = ScriptedLossModule(script, optimizer="adam", lr=0.01, scheduler=schedule)
        pl.Trainer(
            max_steps=steps,
            callbacks=[*callbacks, log],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(module)
        return log

    reducer = PlateauLRReducer(plateau=PlateauDetector(patience=steps // 10, window=10, warmup_steps=0, cooldown=steps))
    print(f"A loss that stalls at step {steps // 2}, warm-up + cosine schedule, {steps} steps: two runs.")
    print("[1/2] training with the schedule alone ...", flush=True)
    plain = train([])
    print("[2/2] training with PlateauLRReducer ...", flush=True)
    guarded = train([reducer])
    for d in reducer.decisions:
        print(d.message)
    last = steps - 1
    print(
        f"LR at the last step: schedule alone {plain.lrs[last]:.3g}, with the reducer {guarded.lrs[last]:.3g} "
        f"(x{guarded.lrs[last] / plain.lrs[last]:.3g})"
    )
    return {"decisions": reducer.decisions, "plain": plain.lrs, "guarded": guarded.lrs}


if __name__ == "__main__":
    main()
