"""The peak LR a run's schedule will reach: the Trainer's LR schedulers stepped to the end of the run on paper.

The in-run LR sweep of ``LRGuard(lr_search=True)`` sets the LR factor so that the schedule's peak lands at the
range test's suggestion, so it needs that peak before the run has got there (a warm-up's peak lies ahead). Each
scheduler of the first optimizer is deep-copied onto a stand-in for the optimizer (copies of its param groups,
the same parameters), and stepped as Lightning would step it: every ``frequency`` optimizer steps (``interval=
"step"``) or once an epoch, to the end of the run. Nothing of the real run is touched.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

__all__ = ["schedule_peak"]

MAX_SCHEDULER_STEPS = 1_000_000  # the longest schedule stepped on paper


@dataclass
class _PaperOptimizer:
    """What a scheduler reads and writes of its optimizer: the param groups (copies; the parameters shared)."""

    param_groups: list[dict[str, Any]]
    defaults: dict[str, Any] = field(default_factory=dict)

    def step(self) -> None:  # pragma: no cover - never called: the schedulers only check that it exists
        pass


def schedule_peak(trainer: Any, total_steps: int | None) -> tuple[float, str]:
    """The highest LR the first param group of the first optimizer will step with over a run of ``total_steps``
    optimizer steps (``None``: not known), the guard's factor and cap applied; and how it was found, in words."""
    optimizer = trainer.optimizers[0]
    now = float(optimizer.param_groups[0]["lr"])
    configs = [
        c
        for c in getattr(trainer, "lr_scheduler_configs", [])
        if getattr(c.scheduler, "optimizer", None) is optimizer and not c.reduce_on_plateau
    ]
    if not configs:
        return now, "no LR scheduler: the LR now"
    if total_steps is None:
        return now, "the run's length is not known: the LR now"
    paper = _PaperOptimizer(
        [{k: v if k == "params" else copy.deepcopy(v) for k, v in g.items()} for g in optimizer.param_groups],
        dict(getattr(optimizer, "defaults", {})),
    )
    memo: dict[int, Any] = {id(optimizer): paper, id(optimizer.param_groups): paper.param_groups}
    for real, copied in zip(optimizer.param_groups, paper.param_groups, strict=True):
        memo[id(real)] = copied
    schedulers = copy.deepcopy([c.scheduler for c in configs], memo)
    batches = getattr(trainer, "num_training_batches", math.inf)
    epoch_steps = (
        max(1, int(batches) // max(1, int(trainer.accumulate_grad_batches))) if math.isfinite(batches) else total_steps
    )
    peak = now
    group = paper.param_groups[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's warning that the optimizer did not step first
        for step in range(1, min(total_steps, MAX_SCHEDULER_STEPS) + 1):
            for config, scheduler in zip(configs, schedulers, strict=True):
                if config.interval == "step" and step % config.frequency == 0:
                    scheduler.step()
                elif config.interval == "epoch" and step % (epoch_steps * config.frequency) == 0:
                    scheduler.step()
            if step < total_steps:  # the LR the next step trains with
                peak = max(peak, float(group["lr"]))
    return peak, f"the schedule stepped on paper over the run's {total_steps} steps"
