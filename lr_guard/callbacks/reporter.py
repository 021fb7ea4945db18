"""What the guard tells a person about a live run: every decision (kept, logged to the Trainer's loggers and to
Python logging on rank zero) and, at the logging cadence, the scalars of the watched values."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

from lr_guard.callbacks.console import show_on_console
from lr_guard.config import GuardConfig
from lr_guard.detectors import Detector
from lr_guard.diagnostics import Diagnostics, scalars
from lr_guard.events import Action, Decision

__all__ = ["Reporter"]

log = logging.getLogger("lr_guard")

SKIPPED_UPDATES = "skipped_updates.json"  # beside the guard's checkpoints: every skipped update, with its batch


class Reporter:
    """Keeps ``decisions`` and sends them, and the scalars, where a person sees them.

    Args:
        config: The guard's settings; of them ``diagnostics`` (send scalars, decisions, the configuration and the
            dashboard layout to the loggers), ``log_every_n_steps`` and ``verbose`` (log every decision through
            Python logging, logger ``"lr_guard"``, on rank zero).
    """

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.decisions: list[Decision] = []
        self._loggers = Diagnostics()
        self._log_every = 0
        self._trainer: Any = None
        self._detectors: Mapping[str, Detector] = {}
        self._counts: Mapping[str, int] = {}

    def attach(
        self,
        trainer: Any,
        settings: dict[str, Any],
        detectors: Mapping[str, Detector],
        counts: Mapping[str, int],
        records_dir: str | None = None,
    ) -> None:
        """A run starts: write the configuration and layout, and log scalars every ``log_every_n_steps`` (default:
        the Trainer's). Skipped updates are listed in ``records_dir/skipped_updates.json`` (rank zero)."""
        self._trainer, self._detectors, self._counts = trainer, detectors, counts
        self._records_path = os.path.join(records_dir, SKIPPED_UPDATES) if records_dir else None
        self._skipped: list[dict[str, Any]] = []
        self._log_every = 0
        if self.config.verbose and trainer.is_global_zero:
            show_on_console()  # every decision reaches the console, as Lightning's own messages do
        if self.config.diagnostics:
            self._loggers.attach(trainer, settings, detectors)
            if self._loggers.active:
                every = self.config.log_every_n_steps
                self._log_every = every or int(getattr(trainer, "log_every_n_steps", 50) or 50)

    def describe(self, trainer: Any, settings: dict[str, Any], detectors: Mapping[str, Detector]) -> None:
        """The configuration once more: the run has shown how it is fed, and the detectors are sized to it."""
        if self.config.diagnostics:
            self._loggers.describe(trainer, settings, detectors)

    @property
    def logs_values(self) -> bool:
        """Some logger takes the scalars of the watched values."""
        return self._log_every > 0

    def value(self, step: int, value: Any) -> None:
        """A watched value (or signals by name) has been dealt with: its scalars, at the logging cadence."""
        if self._log_every and step % self._log_every == 0:
            groups = [
                (f"opt{i}_group{j}", g)
                for i, opt in enumerate(self._trainer.optimizers)
                for j, g in enumerate(opt.param_groups)
            ]
            self._loggers.log_scalars(scalars(value, self._detectors, groups, self._counts), step)

    def decision(self, decision: Decision) -> None:
        self.decisions.append(decision)
        if decision.action in (Action.SKIP, Action.CLIP) and not decision.dry_run:
            self._record_skip(decision)
        if self.config.diagnostics:
            self._loggers.log_decision(decision, dict(self._counts))
        if self.config.verbose and self._trainer is not None and self._trainer.is_global_zero:
            # what changed the run (a rollback, a stop, an update not applied) is a warning: it reaches the console
            loud = (Action.ROLLBACK, Action.STOP, Action.SKIP, Action.CLIP)
            level = logging.WARNING if decision.action in loud else logging.INFO
            log.log(level, "lr_guard: %s", decision.message)

    def note(self, text: str) -> None:
        """Something the user should know about how the guard meets their code (at INFO, on rank zero)."""
        if self.config.verbose and self._trainer is not None and self._trainer.is_global_zero:
            log.info("lr_guard: %s", text)

    def _record_skip(self, decision: Decision) -> None:
        """Add a skipped (or scaled-down) update to the list a person reads to find the bad batches."""
        event = decision.event
        self._skipped.append(
            {
                "step": event.step,
                "epoch": decision.epoch,
                "batch_idx": decision.batch_idx,
                "action": str(decision.action),
                "why": event.message,
                "loss": _json_number(event.value),
                "grad_norm": _json_number(event.score) if event.detector == "gate" else None,
                "detector": event.detector,
            }
        )
        if self._records_path is None or self._trainer is None or not self._trainer.is_global_zero:
            return
        os.makedirs(os.path.dirname(self._records_path), exist_ok=True)
        temporary = self._records_path + ".tmp"
        with open(temporary, "w") as f:
            json.dump(self._skipped, f, indent=1)
        os.replace(temporary, self._records_path)  # a reader never sees half a file


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)
