"""What lr_guard tells a person: scalars, a markdown decision log, a TensorBoard dashboard, its configuration.

Scalars go to every Lightning logger through ``log_metrics`` (TensorBoard, CSV, several at once); the decision
text, the configuration and the custom-scalars dashboard go to loggers whose ``experiment`` is a TensorBoard
``SummaryWriter``. Nothing here reads a device tensor: every value is already a Python float.

Lightning's ``TensorBoardLogger.log_metrics`` writes one event per scalar, and tensorboard's event writer
checksums every record in pure Python on a background thread that the training thread then waits for: about
70 us per scalar, over 1 ms for the guard's 16. For that logger (not a subclass that overrides ``log_metrics``)
the scalars of one step are written as one event with one value per tag, which TensorBoard and its event
readers show exactly alike, in a seventh of the time or less (``python benchmarks/overhead.py --parts`` measures
both).

Log keys (stable):

=================================  =====================================================================
``lr_guard/loss/raw``               the watched value (training loss per optimizer step, or the monitor)
``lr_guard/loss/trend``             the spike detector's trend of it (the smoothed loss)
``lr_guard/loss/spike_level``       the value at which a spike would be reported now
``lr_guard/spike/score``            spike score (robust sigmas above the trend) ...
``lr_guard/spike/threshold``        ... and its threshold
``lr_guard/oscillation/score``      swing-to-noise ratio ... ``/threshold`` its threshold
``lr_guard/plateau/bad_steps``      updates without improvement ... ``/patience`` the patience
``lr_guard/divergence/score``       smoothed loss over its best level ... ``/threshold`` the factor
``lr_guard/lr/opt{i}_group{j}``     the learning rate each param group steps with
``lr_guard/lr_factor/opt{i}_group{j}``  the guard's cumulative factor on it
``lr_guard/count/{name}``           spike, oscillation, plateau, divergence, lr_cuts, rollbacks,
                                    skipped_batches, snapshots: step functions, logged where they change
``lr_guard/<name>/<key>``           what any other detector reports (its ``diagnostics()``), under its name
``lr_guard/<signal>/<key>``         what a detector reports of its signal (``signal_diagnostics()``)
``lr_guard/decisions`` (text)       one markdown entry per decision
``lr_guard/all_decisions`` (text)   every decision of the run as one table, one row each (at the end)
``lr_guard/config`` (text)          the guard's settings, once
``lr_guard/picture`` (image)        the run's loss and decisions, and the LR, when training ends (matplotlib)
=================================  =====================================================================

Every tag of a Custom Scalars chart is logged at the same steps: the tags of charts that share a tag are logged
together or not at all (a detector's statistic that is not known yet, or a NaN loss, leaves the step out of
every chart that draws it), so no chart shows TensorBoard's "The steps for value, lower, and upper tags do not
match". The counters are step functions: each step where one changes gets every counter twice, the value before
and the value after, with nothing in between; a line chart then draws exact steps (TensorBoard's smoothing,
one slider for every chart, bends them: read the counters with smoothing 0).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from lr_guard.detectors import Detector, NullDetector
from lr_guard.events import Decision, kind_name
from lr_guard.executor import ACTIONS
from lr_guard.policy import GATE, LOSS

if TYPE_CHECKING:  # torch and tensorboard are imported where they are used: a replay's scalars need neither
    from torch.utils.tensorboard import SummaryWriter

__all__ = [
    "CONFIG_TAG",
    "DECISIONS_TAG",
    "DECISION_TABLE_TAG",
    "Diagnostics",
    "config_markdown",
    "decision_markdown",
    "layout",
    "scalars",
]

DECISIONS_TAG = "lr_guard/decisions"
CONFIG_TAG = "lr_guard/config"
DECISION_TABLE_TAG = "lr_guard/all_decisions"


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def scalars(
    values: float | Mapping[str, float],
    detectors: Mapping[str, Detector],
    groups: Iterable[tuple[str, dict[str, Any]]],
    counts: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """The scalars for one step's watched values -- the loss as a number, or signals by name -- and what each
    detector reports of itself (``lr_guard/<slot>/...``) and of its signal (``lr_guard/<signal>/...``), with the
    ``counts`` where given. Non-finite entries are left out (a NaN loss shows in the text log)."""
    signals = values if isinstance(values, Mapping) else {LOSS: values}
    out: dict[str, float] = {f"lr_guard/{name}/raw": value for name, value in signals.items() if name != GATE}
    for slot, detector in detectors.items():
        if isinstance(detector, NullDetector):
            continue
        for key, value in detector.signal_diagnostics().items():
            out[f"lr_guard/{detector.signal}/{key}"] = value
        for key, value in detector.diagnostics().items():
            out[f"lr_guard/{slot}/{key}"] = value
    for name, group in groups:
        out[f"lr_guard/lr/{name}"] = float(group["lr"])
        out[f"lr_guard/lr_factor/{name}"] = float(group.get("lr_guard_factor", 1.0))
    for key, count in (counts or {}).items():
        out[f"lr_guard/count/{key}"] = float(count)
    return _finite(out)


def count_scalars(counts: Mapping[str, int]) -> dict[str, float]:
    return {f"lr_guard/count/{key}": float(count) for key, count in counts.items()}


def chart_groups(dashboard: Mapping[str, Mapping[str, list[Any]]]) -> list[frozenset[str]]:
    """The tags the dashboard's charts name (not their patterns), in groups that must be logged at the same
    steps: two charts that share a tag are in one group."""
    groups: list[set[str]] = []
    for charts in dashboard.values():
        for _kind, tags in charts.values():
            named = {t for t in tags if not any(c in t for c in ".*+?[]()|^$")}
            joined = [g for g in groups if g & named]
            for g in joined:
                groups.remove(g)
                named |= g
            if named:
                groups.append(named)
    return [frozenset(g) for g in groups]


def drawable(metrics: dict[str, float], groups: Iterable[frozenset[str]]) -> dict[str, float]:
    """``metrics`` less the tags of any chart group not complete in it: what every chart can draw at this step."""
    missing = [g for g in groups if not g <= metrics.keys()]
    if not missing:
        return metrics
    left_out = frozenset().union(*missing)
    return {k: v for k, v in metrics.items() if k not in left_out}


def layout(detectors: Mapping[str, Detector]) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars dashboard: one section, "lr_guard", with each detector's charts (the loss, each score
    beside its threshold...), the learning rates and the counters."""
    charts: dict[str, list[Any]] = {}
    for slot, detector in detectors.items():
        if isinstance(detector, NullDetector):
            continue
        for title, tags in detector.charts().items():
            kind = "Margin" if tags and tags[0] == "Margin" else "Multiline"
            names = [f"lr_guard/{t.format(slot=slot, signal=detector.signal)}" for t in tags if t != "Margin"]
            charts[title.format(slot=slot, signal=detector.signal)] = [kind, names]
    charts["learning rates"] = ["Multiline", [r"lr_guard/lr/.*"]]
    charts["the guard's LR factors"] = ["Multiline", [r"lr_guard/lr_factor/.*"]]
    charts["counters (step functions: read them with smoothing 0)"] = ["Multiline", [r"lr_guard/count/.*"]]
    return {"lr_guard": charts}


def _done(decision: Decision) -> str:
    done = ACTIONS[decision.action].done_text(decision)
    if decision.lr_before != decision.lr_after:
        done += f"; lr {decision.lr_before:.3g} → {decision.lr_after:.3g}"
    if decision.dry_run:
        done = f"nothing (dry run); the guard would have {done}"
    return done


def _seen(decision: Decision) -> str:
    event = decision.event
    return (
        f"{kind_name(event.kind)}: value {event.value:.4g}, score {event.score:.3g} (threshold {event.threshold:.3g})"
    )


def decision_markdown(decision: Decision, counts: dict[str, int]) -> str:
    """One decision as a small markdown table: what was seen, what was done, the running totals."""
    event = decision.event
    done = _done(decision)
    totals = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items() if v)
    return "\n".join(
        [
            f"**step {event.step}: {kind_name(event.kind)} → {decision.action.value}**",
            "",
            "| | |",
            "|---|---|",
            f"| seen | {_seen(decision)} |",
            f"| why | {event.message} |",
            f"| done | {done} |",
            f"| totals | {totals or 'none'} |",
        ]
    )


def decision_table_markdown(decisions: Iterable[Decision]) -> str:
    """Every decision as one markdown table, one row each, oldest first."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    rows = [
        f"| {d.event.step} | {d.action.value} | {cell(_seen(d))} | {cell(_done(d))} | {cell(d.event.message)} |"
        for d in decisions
    ]
    header = "| step | action | seen | done | why |\n|---|---|---|---|---|"
    return f"**lr_guard decisions** ({len(rows)})\n\n" + ("\n".join([header, *rows]) if rows else "none")


def config_markdown(settings: dict[str, Any]) -> str:
    rows = "\n".join(f"| `{k}` | `{v!r}` |" for k, v in settings.items())
    return f"**lr_guard configuration**\n\n| setting | value |\n|---|---|\n{rows}"


# Where Lightning's own TensorBoardLogger.log_metrics lives, in either namespace
_LIGHTNING_TENSORBOARD = ("lightning_fabric.loggers.tensorboard", "lightning.fabric.loggers.tensorboard")


def one_event_writer(logger: Any) -> SummaryWriter | None:
    """The ``SummaryWriter`` of a logger whose ``log_metrics`` is Lightning's ``TensorBoardLogger``'s own (one
    event per scalar, each written through that writer), or ``None`` for any other logger."""
    log_metrics = getattr(type(logger), "log_metrics", None)
    if getattr(log_metrics, "__module__", None) not in _LIGHTNING_TENSORBOARD:
        return None
    from torch.utils.tensorboard import SummaryWriter

    writer = getattr(logger, "experiment", None)
    return writer if isinstance(writer, SummaryWriter) else None


def write_one_event(logger: Any, writer: SummaryWriter, metrics: dict[str, float], step: int) -> bool:
    """Write ``metrics`` as one event of ``writer`` under the tags ``logger.log_metrics`` would give them (its
    ``prefix`` joined by its ``LOGGER_JOIN_CHAR``). ``False`` (nothing written) when the writer is closed."""
    file_writer = getattr(writer, "file_writer", None)
    if file_writer is None:
        return False
    prefix = getattr(logger, "_prefix", "")  # TensorBoardLogger(prefix=...), set at construction
    join = f"{prefix}{getattr(logger, 'LOGGER_JOIN_CHAR', '-')}" if prefix else ""
    from tensorboard.compat.proto.summary_pb2 import Summary

    summary = Summary(value=[Summary.Value(tag=f"{join}{k}", simple_value=v) for k, v in metrics.items()])
    file_writer.add_summary(summary, step)
    return True


class Diagnostics:
    """Sends the guard's diagnostics to a Trainer's loggers (rank zero only)."""

    def __init__(self) -> None:
        self._loggers: list[Any] = []
        self._one_event: list[SummaryWriter | None] = []  # per logger: its writer, where one event serves
        self._writers: list[Any] = []
        self._warned = False
        self._groups: list[frozenset[str]] = []
        self._counts: dict[str, int] = {}  # the counters as last logged
        self._counts_step = 0

    @property
    def active(self) -> bool:
        """Some logger takes the scalars (there are none off rank zero, or without a logger)."""
        return bool(self._loggers)

    def attach(self, trainer: Any, settings: dict[str, Any], detectors: Mapping[str, Detector]) -> None:
        self._loggers = list(trainer.loggers) if trainer.is_global_zero else []
        self._one_event = [one_event_writer(logger) for logger in self._loggers]
        self._writers = []
        if not trainer.is_global_zero:
            return
        if not self._loggers and not self._warned:
            self._warned = True
            warnings.warn(
                "lr_guard: the Trainer has no logger, so the guard's diagnostics go to Python logging "
                "only; add a TensorBoardLogger to see its dashboard",
                UserWarning,
                stacklevel=2,
            )
        for logger in self._loggers:
            writer = getattr(logger, "experiment", None)
            if callable(getattr(writer, "add_text", None)) and callable(getattr(writer, "add_custom_scalars", None)):
                self._writers.append(writer)
        self.describe(trainer, settings, detectors)

    def describe(self, trainer: Any, settings: dict[str, Any], detectors: Mapping[str, Detector]) -> None:
        """Write the configuration and the dashboard layout (again, when the detectors have been sized to the run)."""
        dashboard = layout(detectors)
        self._groups = chart_groups(dashboard)
        for writer in self._writers:
            writer.add_custom_scalars(dashboard)
            writer.add_text(CONFIG_TAG, config_markdown(settings), trainer.global_step)

    @property
    def takes_images(self) -> bool:
        """Some logger is a TensorBoard one (where the run's picture goes)."""
        return any(callable(getattr(writer, "add_image", None)) for writer in self._writers)

    def log_image(self, tag: str, image: Any, step: int) -> None:
        """An ``(height, width, 3)`` uint8 image to each TensorBoard logger."""
        for writer in self._writers:
            if callable(getattr(writer, "add_image", None)):
                writer.add_image(tag, image, step, dataformats="HWC")

    def log_scalars(self, metrics: dict[str, float], step: int) -> None:
        """One step's scalars, less those some chart could not draw beside the rest of its tags."""
        self._write(drawable(metrics, self._groups), step)

    def _write(self, metrics: dict[str, float], step: int) -> None:
        if not metrics:
            return
        for logger, writer in zip(self._loggers, self._one_event, strict=True):
            if writer is None or not write_one_event(logger, writer, metrics, step):
                logger.log_metrics(metrics, step=step)

    def start_counts(self, counts: Mapping[str, int], step: int) -> None:
        """The counters where a run starts (zero, or a checkpoint's)."""
        self._counts, self._counts_step = dict(counts), step
        self._write(count_scalars(self._counts), step)

    def log_counts(self, counts: Mapping[str, int], step: int, force: bool = False) -> None:
        """The counters, where one has changed since they were last logged (or with ``force``): every counter's
        value before and after, at one step, so that each draws as a step function."""
        if counts == self._counts and not force:
            return
        step = max(step, self._counts_step)  # a skip is decided before the values of earlier steps are checked
        if counts != self._counts:
            self._write(count_scalars(self._counts), step)
        self._write(count_scalars(counts), step)
        self._counts, self._counts_step = dict(counts), step

    def log_decision(self, decision: Decision, counts: dict[str, int]) -> None:
        text = decision_markdown(decision, counts)
        for writer in self._writers:
            writer.add_text(DECISIONS_TAG, text, decision.event.step)

    def log_decision_table(self, decisions: Iterable[Decision], step: int) -> None:
        text = decision_table_markdown(decisions)
        for writer in self._writers:
            writer.add_text(DECISION_TABLE_TAG, text, step)
