"""What the guard tells a person about a live run: every decision (kept, logged to the Trainer's loggers and to
Python logging on rank zero) and, at the logging cadence, the scalars of the watched values; at the end of
training, a picture of the run (its loss with each decision marked, and the LR) in TensorBoard.

The scalars sit at the steps Lightning logs its own metrics at, so that the guard's charts line up with
``train_loss``: Lightning logs a training step's metrics when ``(its index + 1) % log_every_n_steps == 0``,
at its index (steps 4, 9, 14... for 5), and a validation's at the index of the training step before it
(``global_step - 1``)."""

from __future__ import annotations

import importlib.util
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
from lr_guard.policy import LOSS
from lr_guard.run_record import RunRecord

__all__ = ["Reporter"]

log = logging.getLogger("lr_guard")

SKIPPED_UPDATES = "skipped_updates.json"  # beside the guard's checkpoints: every skipped update, with its batch
PICTURE_TAG = "lr_guard/picture"  # the run's picture (lr_guard.plot), an image written when training ends


class Reporter:
    """Keeps ``decisions`` and sends them, and the scalars, where a person sees them.

    Args:
        config: The guard's settings; of them ``diagnostics`` (send scalars, decisions, the configuration and the
            dashboard layout to the loggers, and the run's picture to a TensorBoard logger when matplotlib is
            installed), ``log_every_n_steps`` and ``verbose`` (log every decision through Python logging, logger
            ``"lr_guard"``, on rank zero).
    """

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.decisions: list[Decision] = []
        self._loggers = Diagnostics()
        self._log_every = 0
        self._trainer: Any = None
        self._detectors: Mapping[str, Detector] = {}
        self._counts: Mapping[str, int] = {}
        self.per_validation = False  # the watched values come after validation runs (set by the callback)
        self._last_step = 0
        self.record = RunRecord()  # the watched values and the LR, for the picture (bounded memory)
        self._draws = False

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
        self.record.clear()
        self._draws = False
        if self.config.verbose and trainer.is_global_zero:
            show_on_console()  # every decision reaches the console, as Lightning's own messages do
        if self.config.diagnostics:
            self._loggers.attach(trainer, settings, detectors)
            if self._loggers.active:
                every = self.config.log_every_n_steps
                self._log_every = every or int(getattr(trainer, "log_every_n_steps", 50) or 50)
                self._last_step = trainer.global_step
                self._loggers.start_counts(counts, trainer.global_step)
            self._draws = self._loggers.takes_images and importlib.util.find_spec("matplotlib") is not None

    def describe(self, trainer: Any, settings: dict[str, Any], detectors: Mapping[str, Detector]) -> None:
        """The configuration once more: the run has shown how it is fed, and the detectors are sized to it."""
        if self.config.diagnostics:
            self._loggers.describe(trainer, settings, detectors)

    @property
    def logs_values(self) -> bool:
        """Some logger takes the watched values: their scalars, or the run's picture."""
        return self._log_every > 0 or self._draws

    def value(self, step: int, value: Any) -> None:
        """A watched value (or signals by name) has been dealt with: kept for the picture, the counters where they
        changed, and its scalars at the logging cadence, at Lightning's step for it (every validation's, like
        Lightning)."""
        if self._draws:
            optimizers = self._trainer.optimizers
            lr = float(optimizers[0].param_groups[0]["lr"]) if optimizers else math.nan
            self.record.add(step, float(value.get(LOSS, math.nan) if isinstance(value, Mapping) else value), lr)
        if not self._log_every:
            return
        self._loggers.log_counts(self._counts, step)
        self._last_step = step
        if self.per_validation:
            logged_at = max(step - 1, 0)
        elif (step + 1) % self._log_every == 0:
            logged_at = step
        else:
            return
        groups = [
            (f"opt{i}_group{j}", g)
            for i, opt in enumerate(self._trainer.optimizers)
            for j, g in enumerate(opt.param_groups)
        ]
        self._loggers.log_scalars(scalars(value, self._detectors, groups), logged_at)

    def finish(self) -> None:
        """Training has ended: the counters' last values (the end of each step function), every decision of the
        run as one table, and the run's picture (rank zero, with matplotlib installed)."""
        if self._log_every:
            self._loggers.log_counts(self._counts, self._last_step, force=True)
        if self.config.diagnostics and self._loggers.active:
            self._loggers.log_decision_table(self.decisions, self._last_step)
        if self._draws and len(self.record):
            from lr_guard.plot import draw_record, to_rgb

            figure = draw_record(self.record, self.decisions, value_label=self.config.monitor or "loss")
            self._loggers.log_image(PICTURE_TAG, to_rgb(figure), self._trainer.global_step)

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
