"""``lr-guard replay``: what would lr_guard have done on a finished run?

Reads a loss series from a TensorBoard event file or log directory (a scalar tag; by default the training loss
Lightning logged) or from a CSV with ``step,loss`` columns, runs the guard's detectors and rules over it -- the
same :class:`~lr_guard.policy.GuardPolicy` ``LRGuard`` runs, built from the same settings -- and prints every event
with the action the guard would have taken. Optionally writes the guard's diagnostics as a new TensorBoard run
beside the original, so both can be viewed together.

    lr-guard replay lightning_logs/version_3
    lr-guard replay run.csv --set skip_batches=100 --set spike.threshold=7
    lr-guard replay lightning_logs/version_3 --config guard.yaml --tensorboard
    lr-guard replay run.csv --plot run.png

The learning rate, where the log has it (a CSV's ``lr`` column; in event files ``--lr-tag``, by default the first
tag LearningRateMonitor writes, ``lr-<optimizer>``), tells the rules when a warm-up is under way, as the live
guard sees it: a plateau cut is held while the LR rises, and a rollback then always cuts the LR. Without it the
whole run counts as past its warm-up.

After the first rollback the log shows what the run did *without* the guard; the decisions after it are what the
guard would have done on that same stream, not a prediction of the rescued run.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import functools
import importlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lr_guard.detectors import Detector
    from lr_guard.events import Decision

__all__ = [
    "DEFAULT_TAGS",
    "ReplayError",
    "ReplayResult",
    "guard_settings",
    "load_lr_series",
    "load_series",
    "main",
    "replay",
]

DEFAULT_TAGS = ("train_loss_step", "train_loss", "loss", "train/loss", "training_loss")
_GUARD_CLASSES = ("lr_guard.LRGuard", "lr_guard.lightning.LRGuard", "lr_guard.callbacks.LRGuard")


class ReplayError(Exception):
    """A problem with the input, with a message that says what to do."""


# ---------------------------------------------------------------------------------------------- reading the log
def _read_csv(path: Path, column: str = "loss", required: bool = True) -> list[tuple[int, float]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "step" not in fields or column not in fields:
            if not required:
                return []
            raise ReplayError(f"{path}: a CSV needs 'step' and '{column}' columns; its header is {reader.fieldnames}")
        step_key = reader.fieldnames[fields.index("step")]  # type: ignore[index]
        value_key = reader.fieldnames[fields.index(column)]  # type: ignore[index]
        series = []
        for line, row in enumerate(reader, start=2):
            try:
                series.append((int(float(row[step_key])), float(row[value_key])))
            except (TypeError, ValueError) as err:
                raise ReplayError(f"{path}, line {line}: cannot read step/{column} from {row}") from err
    return series


def _event_dirs(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted({p.parent for p in path.rglob("events.out.tfevents.*")})


@functools.lru_cache(maxsize=16)
def _load(source: str, version: tuple[int, ...]) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(source, size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def _accumulator(source: Path) -> Any:
    """The scalars of an event file or directory, read once (the loss and the LR come from the same files)."""
    files = [source] if source.is_file() else sorted(source.glob("events.out.tfevents.*"))
    try:
        return _load(str(source), tuple(f.stat().st_mtime_ns for f in files))
    except Exception as err:  # the reader raises several kinds on a file that is no event file
        raise ReplayError(f"{source}: not a readable TensorBoard event file ({type(err).__name__}: {err})") from err


def _read_events(path: Path, tag: str | None) -> tuple[list[tuple[int, float]], str, str]:
    sources = _event_dirs(path)
    if not sources:
        raise ReplayError(
            f"{path}: no TensorBoard event files (events.out.tfevents.*) found there; pass an event "
            "file, a log directory, or a CSV with step,loss columns"
        )
    found: dict[Path, list[str]] = {}
    for source in sources:
        acc = _accumulator(source)
        found[source] = acc.Tags().get("scalars", [])
        if tag is not None and tag in found[source]:
            return [(e.step, e.value) for e in acc.Scalars(tag)], tag, str(source)
    all_tags = sorted({t for tags in found.values() for t in tags})
    if not all_tags:
        raise ReplayError(
            f"{path}: holds no scalar summaries -- not a TensorBoard event file, or one with no scalars logged"
        )
    if tag is not None:
        raise ReplayError(f"{path}: no scalar tag {tag!r}; the tags are: {', '.join(all_tags) or '(none)'}")
    for candidate in DEFAULT_TAGS:
        holders = [s for s, tags in found.items() if candidate in tags]
        if len(holders) > 1:
            raise ReplayError(
                f"{path}: {len(holders)} runs log {candidate!r} ({', '.join(map(str, holders))}); pass one of them"
            )
        if holders:
            return _read_events(holders[0], candidate)
    raise ReplayError(
        f"{path}: none of the usual loss tags ({', '.join(DEFAULT_TAGS)}) is there; choose one with "
        f"--tag. The scalar tags are: {', '.join(all_tags) or '(none)'}"
    )


def load_lr_series(path: str | os.PathLike[str], tag: str | None = None) -> tuple[list[tuple[int, float]], str | None]:
    """The learning rate the run used, as ``(step, lr)`` pairs, and where it was read; ``([], None)`` when the log
    does not have it. In a CSV the column ``tag`` (default ``lr``); in event files ``tag``, or the first ``lr-*``
    tag (Lightning's ``LearningRateMonitor``). A ``tag`` that is not there is an error."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        column = (tag or "lr").strip().lower()
        series = _read_csv(path, column, required=tag is not None)
        return (sorted(series), column) if series else ([], None)
    if tag is None:
        for source in _event_dirs(path):
            acc = _accumulator(source)
            candidates = sorted(t for t in acc.Tags().get("scalars", []) if t.startswith("lr-"))
            if candidates:
                return sorted((e.step, e.value) for e in acc.Scalars(candidates[0])), candidates[0]
        return [], None
    series, tag_used, _ = _read_events(path, tag)
    return sorted(series), tag_used


def load_series(path: str | os.PathLike[str], tag: str | None = None) -> tuple[list[tuple[int, float]], str, str]:
    """Read ``(step, value)`` pairs; returns them, the tag (or column) read, and the file or directory read."""
    path = Path(path)
    if not path.exists():
        raise ReplayError(f"{path}: no such file or directory")
    if path.is_file() and path.suffix.lower() == ".csv":
        series, tag_used, source = _read_csv(path), "loss", str(path)
    elif path.is_file() and "tfevents" not in path.name:
        raise ReplayError(f"{path}: not a TensorBoard event file (events.out.tfevents.*) nor a .csv")
    else:
        series, tag_used, source = _read_events(path, tag)
    if not series:
        raise ReplayError(f"{source}: the series {tag_used!r} is empty")
    series.sort(key=lambda pair: pair[0])
    return series, tag_used, source


# ---------------------------------------------------------------------------------------------- settings
def _instantiate(spec: Any) -> Any:
    """A LightningCLI ``class_path``/``init_args`` entry as the object it names (lists of them too)."""
    if isinstance(spec, list):
        return [_instantiate(item) for item in spec]
    if isinstance(spec, dict) and "class_path" in spec:
        module_name, _, name = str(spec["class_path"]).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as err:
            raise ReplayError(
                f"cannot import {spec['class_path']!r} ({err}); a detector of your own must be importable, "
                "e.g. run lr-guard from the folder of its module or put that folder on PYTHONPATH"
            ) from err
        kwargs = {k: _instantiate(v) for k, v in (spec.get("init_args") or {}).items()}
        parameters = inspect.signature(cls).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
            for key in kwargs:
                if key not in parameters:
                    raise ReplayError(f"{spec['class_path']}: {_not_one_of(key, 'one of its arguments', parameters)}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            raise ReplayError(f"{spec['class_path']}: {err}") from err
    return spec


def _not_one_of(key: str, what: str, valid: Iterable[str]) -> str:
    """``'key' is not <what>``, with the closest valid name, or the valid names when none is close."""
    names = sorted(valid)
    close = difflib.get_close_matches(key, names, n=1)
    if close:
        return f"{key!r} is not {what}; did you mean {close[0]!r}?"
    return f"{key!r} is not {what}; the valid names are: {', '.join(names)}"


def _setting_names() -> set[str]:
    from lr_guard.config import BUILT_IN_DETECTORS, GuardConfig

    return {*GuardConfig.names(), *BUILT_IN_DETECTORS, "detectors"}


def guard_settings(config: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """``LRGuard`` keyword arguments from a YAML file in LightningCLI's format and ``key=value`` overrides.

    The YAML may be a whole LightningCLI config (its ``trainer.callbacks`` entry for ``lr_guard.LRGuard`` is used),
    one callback entry (``class_path`` / ``init_args``), or plain keyword arguments. Overrides take YAML values;
    ``spike.threshold=7`` sets a detector's argument.
    """
    import yaml

    settings: dict[str, Any] = {}
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise ReplayError(f"{path}: no such config file")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ReplayError(f"{path}: expected a mapping, got {type(data).__name__}")
        if "trainer" in data:
            entries = [
                c
                for c in (data["trainer"] or {}).get("callbacks", []) or []
                if isinstance(c, dict) and c.get("class_path") in _GUARD_CLASSES
            ]
            if not entries:
                raise ReplayError(f"{path}: trainer.callbacks has no lr_guard.LRGuard entry")
            data = entries[0]
        if "class_path" in data:
            if data["class_path"] not in _GUARD_CLASSES:
                raise ReplayError(f"{path}: class_path {data['class_path']!r} is not lr_guard.LRGuard")
            data = data.get("init_args") or {}
        settings.update(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ReplayError(f"--set takes key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or type(err).__name__
            raise ReplayError(f"--set {item}: {raw!r} is not a YAML value ({problem})") from err
        if "." in key:
            detector, _, arg = key.partition(".")
            spec = settings.get(detector)
            if not isinstance(spec, dict):
                from lr_guard.config import BUILT_IN_DETECTORS

                cls = BUILT_IN_DETECTORS.get(detector)
                if cls is None:
                    raise ReplayError(f"--set {item}: {_not_one_of(detector, 'a detector', BUILT_IN_DETECTORS)}")
                arguments = inspect.signature(cls).parameters
                if arg not in arguments:
                    raise ReplayError(f"--set {item}: {_not_one_of(arg, f'an argument of {cls.__name__}', arguments)}")
                spec = {"class_path": f"lr_guard.{cls.__name__}", "init_args": {}}
            spec.setdefault("init_args", {})[arg] = value
            settings[detector] = spec
        else:
            if key not in _setting_names():
                raise ReplayError(f"--set {item}: {_not_one_of(key, 'an LRGuard setting', _setting_names())}")
            settings[key] = value
    unknown = sorted(set(settings) - _setting_names())
    if unknown:
        raise ReplayError(f"{config}: {_not_one_of(unknown[0], 'an LRGuard setting', _setting_names())}")
    return {k: _instantiate(v) for k, v in settings.items()}


# ---------------------------------------------------------------------------------------------- replay
@dataclass
class ReplayRow:
    step: int
    kind: str
    value: float
    score: float
    threshold: float
    action: str
    detail: str
    message: str


@dataclass
class ReplayResult:
    rows: list[ReplayRow]
    n_values: int
    lr_factor: float
    settings: dict[str, Any] = field(default_factory=dict)
    scalars: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    detectors: dict[str, Any] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    spacing: int = 1  # the steps between logged values
    rescaled: dict[str, dict[str, tuple[Any, Any]]] = field(default_factory=dict)  # slot -> setting -> before, after


class _PaperOptimizer:
    """An optimizer on paper: one param group whose LR follows the logged LR (1.0, the factor alone, without
    one), written by the same LR actions as a live optimizer's, so ``min_lr`` and ``eps`` hold offline too."""

    def __init__(self, lr: float) -> None:
        self.param_groups: list[dict[str, Any]] = [{"lr": lr}]


class _PaperRun:
    """A replay's :class:`~lr_guard.executor.RunState`: the log goes on as the run went without the guard, so a
    restore puts back only what a snapshot holds of the LR (the guard's factors at its step), and no checkpoint
    is written."""

    def __init__(self, lr: float) -> None:
        self.optimizers = [_PaperOptimizer(lr)]
        self.step = 0
        self.readings: Sequence[tuple[int, float]] = ()  # the logged LR, (step, lr)
        self._factors: dict[int, list[list[float]]] = {}

    def snapshot(self, step: int) -> None:
        from lr_guard.actions.lr import lr_factors

        self._factors[step] = lr_factors(self.optimizers)

    def take_snapshot(self) -> int:
        self.snapshot(self.step)
        return self.step

    def restore(self, step: int) -> None:
        from lr_guard.actions.lr import set_lr_factors

        set_lr_factors(self.optimizers, self._factors[step])

    def stop(self, step: int) -> str | None:
        self.restore(step)
        return None

    def locate(self, step: int) -> tuple[int, int] | None:
        return None

    def lrs_at(self, step: int) -> list[list[float]] | None:
        """The LR at ``step``: the last logged reading at or before it, the guard's factor and cap applied."""
        from lr_guard.actions.lr import set_scheduled_lr

        before = [rate for reading_step, rate in self.readings if reading_step <= step]
        if not before:
            return None
        group = _PaperOptimizer(before[-1])
        group.param_groups = [dict(self.optimizers[0].param_groups[0])]
        set_scheduled_lr(group, [before[-1]])
        return [[float(group.param_groups[0]["lr"])]]


def _checks(
    series: Iterator[tuple[int, float]], n: int, config: Any, steps_per_epoch: int | None, start: int
) -> Iterator[tuple[list[tuple[int, float]], int | None]]:
    """The values in the batches the live guard checks them in, each with the step of the snapshot due after it
    (else ``None``): it checks every ``check_every_n_steps`` optimizer steps (every step with ``skip_spikes``),
    before each snapshot and at the end of each epoch (of ``steps_per_epoch`` steps, when known). On a log that
    holds every k-th step, a check (or snapshot) falls on the first logged step at or after the live guard's."""
    every = 1 if config.skip_spikes else config.check_every_n_steps
    batch: list[tuple[int, float]] = []
    before = start  # Lightning's global_step before the step of the first value trained
    for i, (step, value) in enumerate(series):
        batch.append((step, value))
        after = step + 1  # Lightning's global_step once this step has trained

        def passed(period: int | None, after: int = after, before: int = before) -> bool:
            return period is not None and after // period > before // period  # a multiple of period in (before, after]

        snapshot_due = config.rollback and passed(config.snapshot_every)
        if snapshot_due or passed(every) or passed(steps_per_epoch) or i == n - 1:
            yield batch, after // config.snapshot_every * config.snapshot_every if snapshot_due else None
            batch = []
        before = after


def replay(
    series: Sequence[tuple[int, float]],
    settings: dict[str, Any] | None = None,
    log_every_n_steps: int = 1,
    lr: Sequence[tuple[int, float]] = (),
    max_steps: int | None = None,
    steps_per_epoch: int | None = None,
) -> ReplayResult:
    """Run the guard's rules over ``series``; return what it would have done, and its diagnostics' scalars.

    The values go through the live guard's parts -- the policy built from the same validated settings and the
    same executor of intents, in the same batches (``check_every_n_steps``; after a rollback the rest of a batch
    is dropped, as the live guard drops values that describe discarded weights), with the same skipped updates
    and snapshot steps. ``lr``: the run's learning rate as ``(step, lr)`` pairs, sorted by step; where it
    rises, a warm-up is under way (the policy's ``lr_rising``, read at each check as the live guard reads the
    optimizer), and the LR the decisions report is that LR with the guard's factor applied (``min_lr`` holds);
    without it the LR is 1.0, so the decisions report the guard's factor. ``max_steps``: the Trainer's
    ``max_steps`` of the run, to which ``plateau=True`` sizes the plateau detector as the live guard does (without
    it, the default plateau detector). ``steps_per_epoch``: the run's optimizer steps per epoch, at whose ends the
    live guard checks too (without it, epoch ends are not known; where an epoch is not a multiple of the check
    cadence, decisions after a rollback may then fall on other steps than the live guard's). On a GPU the live
    guard's values arrive a check late or so, which a replay does not model."""
    from lr_guard.config import BUILT_IN_DETECTORS, GuardConfig, build_detectors, run_sized_plateau

    for name, value in (("max_steps", max_steps), ("steps_per_epoch", steps_per_epoch)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ReplayError(f"{name} must be a positive number of steps, got {value!r}")
    settings = dict(settings or {})
    try:
        config = GuardConfig.from_settings(settings)
        # a trial's outcome is the loss of a run that took it, which a log of the run without it does not hold
        config.lr_search = False
        switches: dict[str, Any] = {k: settings[k] for k in BUILT_IN_DETECTORS if k in settings}
        if max_steps is not None and switches.get("plateau", True) is True:  # as the live guard sizes it
            switches["plateau"] = run_sized_plateau(max_steps)
        detectors = build_detectors(switches, settings.get("detectors") or ())
        unknown = sorted(set(settings) - _setting_names())
        if unknown:
            raise ValueError(_not_one_of(unknown[0], "an LRGuard setting", _setting_names()))
        other = sorted({f"{name} (signal={d.signal!r})" for name, d in detectors.items() if d.signal != "loss"})
        if other:
            raise ValueError(
                f"a replay reads one series, the loss; these detectors read another signal: {', '.join(other)}. "
                "Leave them out of the replay's settings"
            )
    except (TypeError, ValueError, AttributeError) as err:
        raise ReplayError(f"invalid guard settings: {err}") from err
    spacing = logged_spacing(series)
    scaled = {slot: per_logged_value(detector, spacing) for slot, detector in detectors.items()}
    detectors = {slot: detector for slot, (detector, _) in scaled.items()}
    paper = _PaperGuard(config, detectors, lr, log_every_n_steps)
    paper.run(series, steps_per_epoch, spacing)
    result = ReplayResult(
        paper.rows, len(series), paper.factor, _settings(config, detectors), paper.logged, detectors, paper.decisions
    )
    result.spacing = spacing
    result.rescaled = {slot: changes for slot, (_, changes) in scaled.items() if changes}
    return result


def logged_spacing(series: Sequence[tuple[int, float]]) -> int:
    """The steps between logged values: the most common gap (1 for a log of every step; Lightning's default
    ``log_every_n_steps=50`` and a logger's ``log_every_n_steps=10`` make 50 and 10)."""
    gaps = Counter(b[0] - a[0] for a, b in itertools.pairwise(series) if b[0] > a[0])
    return max(gaps.most_common(1)[0][0], 1) if gaps else 1


def per_logged_value(detector: Detector, spacing: int) -> tuple[Detector, dict[str, tuple[Any, Any]]]:
    """``detector`` rebuilt for a log that holds every ``spacing``-th step, and the settings changed (name ->
    (before, after)): its ``value_counts`` divided by ``spacing``, rounded up (to the least it accepts), and its
    ``value_decays`` raised to the power ``spacing``, so that each still spans the steps it spans live. The
    counts are those of ``detector.scaled_counts()``: a plateau detector whose patience is a share of the run
    keeps its counts, which are sample sizes."""
    cls = type(detector)
    counts = detector.scaled_counts()
    if spacing == 1 or not (counts or cls.value_decays):
        return detector, {}
    settings = detector.settings()
    for name in cls.value_decays:
        settings[name] = settings[name] ** spacing
    for name in counts:
        original = int(settings[name])
        for count in range(math.ceil(original / spacing), original + 1):
            try:
                cls(**{**settings, name: count})
            except (TypeError, ValueError):
                continue
            settings[name] = count
            break
    changes = {k: (v, settings[k]) for k, v in detector.settings().items() if settings[k] != v}
    return cls(**settings), changes


class _PaperGuard:
    """The guard's policy and executor over a logged series, on a :class:`_PaperRun`."""

    def __init__(self, config: Any, detectors: dict[str, Any], lr: Sequence[tuple[int, float]], every: int) -> None:
        from lr_guard.executor import IntentExecutor
        from lr_guard.policy import GuardPolicy

        self.config, self.detectors, self.lr, self.every = config, detectors, lr, every
        self.policy = GuardPolicy(detectors, config)
        self.executor = IntentExecutor(self.policy, config)
        self.paper = _PaperRun(lr[0][1] if lr else 1.0)
        self.paper.readings = lr
        self.executor.prepare(self.paper.optimizers)
        self.rows: list[ReplayRow] = []
        self.decisions: list[Decision] = []
        self.logged: list[tuple[int, dict[str, float]]] = []
        self._next_lr = 0

    @property
    def factor(self) -> float:
        from lr_guard.actions.lr import lr_factors

        return lr_factors(self.paper.optimizers)[0][0]

    def run(self, series: Sequence[tuple[int, float]], steps_per_epoch: int | None, spacing: int = 1) -> None:
        policy = self.policy
        start = max(0, series[0][0] - spacing + 1)  # a log of every k-th step starts k - 1 steps into the run
        policy.start(start)
        self.paper.snapshot(start)
        values = _with_skips(series, policy, self.config, start)
        for batch, snapshot_step in _checks(values, len(series), self.config, steps_per_epoch, start):
            self._follow_lr(batch[-1][0])
            self.paper.step = batch[-1][0] + 1
            self.executor.process(batch, self.paper, self._report, self._log_value)
            if policy.stopped:
                break
            if snapshot_step is not None and policy.wants_snapshot(snapshot_step):
                policy.snapshot_taken(snapshot_step)
                self.paper.snapshot(snapshot_step)

    def _follow_lr(self, step: int) -> None:
        """Each LR reading up to ``step`` once, as the live guard reads the optimizer's at a check: "rising" is
        against the reading before, and lasts until the next one (a monitor logs the LR every few steps)."""
        from lr_guard.actions.lr import set_scheduled_lr

        lr = self.lr
        while self._next_lr < len(lr) and lr[self._next_lr][0] <= step:
            reading_step, rate = lr[self._next_lr]
            self.policy.note_lr(rate, reading_step)
            set_scheduled_lr(self.paper.optimizers[0], [rate])
            self._next_lr += 1

    def _report(self, decision: Decision) -> None:
        from lr_guard.executor import ACTIONS

        event = decision.event
        self.decisions.append(decision)
        detail = ACTIONS[decision.action].detail(decision, self.factor)
        row = (event.step, str(event.kind), event.value, event.score, event.threshold, str(decision.action))
        self.rows.append(ReplayRow(*row, detail, decision.message))

    def _log_value(self, step: int, value: float) -> None:
        from lr_guard.diagnostics import scalars

        if step % self.every == 0:
            groups = [(f"opt0_group{j}", g) for j, g in enumerate(self.paper.optimizers[0].param_groups)]
            metrics = scalars(value, self.detectors, groups, self.policy.counts)
            if not self.lr:
                metrics.pop("lr_guard/lr/opt0_group0", None)  # no learning rate is known offline, only the factor
            self.logged.append((step, metrics))


def _with_skips(
    series: Sequence[tuple[int, float]], policy: Any, config: Any, start: int
) -> Iterator[tuple[int, float]]:
    """The series, telling the policy of each update the live guard would skip before it is applied (after a
    rollback, and with ``skip_spikes`` a spiking step), as the live guard does before each optimizer step: the
    steps a subsampled log leaves out count too (``skip_batches`` counts steps)."""
    next_step = start
    for step, value in series:
        for unlogged in range(next_step, step):
            policy.should_skip(unlogged)
        next_step = step + 1
        policy.should_skip(step, (lambda v=value: v) if config.skip_spikes else None)
        yield step, value


def _settings(config: Any, detectors: dict[str, Any]) -> dict[str, Any]:
    """Every setting the replay ran with, as the configuration entry shows them (detectors as their repr)."""
    shown: dict[str, Any] = {name: getattr(config, name) for name in type(config).names()}
    shown.update({slot: repr(detector) for slot, detector in detectors.items()})
    return shown


def write_tensorboard(result: ReplayResult, out_dir: str | os.PathLike[str]) -> str:
    """Write the replay's scalars, decisions, configuration and dashboard layout as a TensorBoard run."""
    from torch.utils.tensorboard import SummaryWriter

    from lr_guard.diagnostics import CONFIG_TAG, DECISIONS_TAG, config_markdown, layout

    writer = SummaryWriter(log_dir=str(out_dir))
    try:
        writer.add_custom_scalars(layout(result.detectors))
        writer.add_text(CONFIG_TAG, config_markdown(result.settings), 0)
        for step, metrics in result.scalars:
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, step)
        for row in result.rows:
            writer.add_text(DECISIONS_TAG, f"**step {row.step}: {row.kind} → {row.action}**\n\n{row.message}", row.step)
    finally:
        writer.close()
    return str(out_dir)


def write_plot(
    result: ReplayResult, series: Sequence[tuple[int, float]], path: str | os.PathLike[str], lr_known: bool
) -> str:
    """Write the picture of the replayed run (:mod:`lr_guard.plot`): the logged loss with the guard's decisions,
    and beneath it the LR the guard would have trained with (its factor alone where the log has no LR)."""
    from lr_guard.plot import draw_record, save_figure
    from lr_guard.run_record import RunRecord

    lr_tag = "lr_guard/lr/opt0_group0" if lr_known else "lr_guard/lr_factor/opt0_group0"
    lrs = sorted((step, metrics[lr_tag]) for step, metrics in result.scalars if lr_tag in metrics)
    record, k, lr = RunRecord(), 0, math.nan
    for step, value in series:
        while k < len(lrs) and lrs[k][0] <= step:
            lr = lrs[k][1]
            k += 1
        record.add(step, value, lr)
    figure = draw_record(record, result.decisions, lr_label="learning rate" if lr_known else "the guard's LR factor")
    return str(save_figure(figure, path))


def subsampled_note(result: ReplayResult) -> str:
    """What a replay of a log that holds every k-th step does about it, in a few plain lines."""
    k = result.spacing
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    changed = "; ".join(
        f"{slot}: " + ", ".join(f"{name} {before:g} -> {after:g}" for name, (before, after) in changes.items())
        for slot, changes in result.rescaled.items()
    )
    lines = [
        f"the log holds every {k}{suffix} step: the guard would have seen {k} times as many values. The replay "
        f"counts its settings in steps: snapshot_every, check_every_n_steps, confirm_steps and skip_batches as "
        f"they are, the detectors' windows and patience per logged value ({changed or 'none to change'}). A "
        f"decision falls on the first logged step at or after the live guard's, up to {k - 1} steps later; "
        f"a rise or a NaN between two logged steps is seen only where it lasts to a logged one.",
    ]
    fixed = [slot for slot, d in result.detectors.items() if not (d.scaled_counts() or type(d).value_decays)]
    fixed = [slot for slot in fixed if type(result.detectors[slot]).kind != "off"]
    if fixed:
        lines.append(
            f"{', '.join(fixed)}: no value_counts or value_decays declared, so its settings count logged values"
        )
    return "\n".join(lines)


def format_table(result: ReplayResult) -> str:
    from lr_guard.events import EventKind

    header = f"{'step':>8}  {'event':<11} {'value':>10} {'score':>9} {'thresh':>7}  {'action':<9} detail"
    lines = [header, "-" * len(header)]
    for r in result.rows:
        score, threshold, detail = f"{r.score:>9.3g}", f"{r.threshold:>7.3g}", r.detail
        if r.kind == EventKind.PLATEAU.value:  # its score is a count of steps: said in words, not as a statistic
            score, threshold = f"{'':>9}", f"{'':>7}"
            detail = f"{r.score:.0f} steps without improvement (patience {r.threshold:.0f}); {detail}"
        lines.append(f"{r.step:>8}  {r.kind:<11} {r.value:>10.4g} {score} {threshold}  {r.action:<9} {detail}")
    if not result.rows:
        lines.append("(no events: the guard would have done nothing)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- command line
def _plain(text: str) -> str:
    """Docstring markup as plain text for a terminal: ``code`` as code, :class:`~a.B` as B, :func:`a.b` as a.b."""
    text = re.sub(r":[a-z]+:`~[\w.]*?(\w+)`", r"\1", text)
    text = re.sub(r":[a-z]+:`([^`]+)`", r"\1", text)
    text = re.sub(r"``(.+?)``", r"\1", text, flags=re.DOTALL)
    return re.sub(r"\*(\w[^*]*)\*", r"\1", text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lr-guard", description="lr_guard's command-line tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    rp = sub.add_parser(
        "replay",
        help="what would lr_guard have done on a finished run?",
        description=_plain(__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rp.add_argument("path", help="a TensorBoard event file or log directory, or a CSV with step,loss columns")
    rp.add_argument("--tag", help=f"scalar tag to read (default: the first of {', '.join(DEFAULT_TAGS)})")
    rp.add_argument(
        "--lr-tag",
        help="scalar tag of the learning rate, to see warm-ups (default: the first lr-* tag, if any; in a CSV "
        "the lr column)",
    )
    rp.add_argument("--config", help="YAML with the guard's settings (LightningCLI format, or plain init_args)")
    rp.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one LRGuard setting, e.g. skip_batches=100 or spike.threshold=7 (repeatable)",
    )
    rp.add_argument(
        "--tensorboard",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="also write the guard's diagnostics as a TensorBoard run (default DIR: lr_guard_replay beside the input)",
    )
    rp.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="the run's Trainer max_steps: the default plateau detector is sized to it, as the live guard sizes it",
    )
    rp.add_argument(
        "--steps-per-epoch",
        type=int,
        default=None,
        help="the run's optimizer steps per epoch: the live guard also checks at each epoch's end",
    )
    rp.add_argument(
        "--plot",
        metavar="FILE",
        help="also draw the replayed run -- its loss with each decision marked, and the LR -- to FILE "
        "(.png, .svg or .pdf; needs matplotlib: pip install 'lr_guard[plot]')",
    )
    rp.add_argument("--json", action="store_true", help="print the events as JSON instead of a table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.plot is not None:
            _check_plot_option(args.plot)
        series, tag, source = load_series(args.path, args.tag)
        lr, lr_tag = load_lr_series(args.path, args.lr_tag)
        settings = guard_settings(args.config, args.set)
        result = replay(series, settings, lr=lr, max_steps=args.max_steps, steps_per_epoch=args.steps_per_epoch)
    except ReplayError as err:
        print(f"lr-guard replay: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.__dict__ for r in result.rows], default=lambda x: None if not math.isfinite(x) else x))
    else:
        print(f"{source}: {result.n_values} values of {tag!r}, steps {series[0][0]}..{series[-1][0]}")
        if lr_tag is None:
            print("no learning rate in the log: the whole run counts as past its warm-up (see --lr-tag)")
        else:
            print(f"learning rate from {lr_tag!r}: warm-ups seen where it rises")
        if result.spacing > 1:
            print(subsampled_note(result))
        print(format_table(result))
        actions = [r.action for r in result.rows]
        print(
            f"\n{len(result.rows)} event(s); {actions.count('rollback')} rollback(s), "
            f"{actions.count('lr_cut')} LR cut(s), stop: {'yes' if 'stop' in actions else 'no'}; "
            f"final LR factor x{result.lr_factor:.3g}"
            + (" (a stop restores the last good state, with its LR)" if "stop" in actions else "")
        )
    if args.plot is not None:
        print(f"picture written to {write_plot(result, series, args.plot, lr_tag is not None)}")
    if args.tensorboard is not None:
        base = Path(args.path)
        out = args.tensorboard or str((base if base.is_dir() else base.parent) / "lr_guard_replay")
        print(
            f"diagnostics written to {write_tensorboard(result, out)}; view both with: "
            f"tensorboard --logdir {Path(out).parent}"
        )
    return 0


def _check_plot_option(path: str) -> None:
    """``--plot FILE`` can be written: a known extension, and matplotlib installed (checked before replaying)."""
    formats = ("png", "svg", "pdf")  # lr_guard.plot.FORMATS, without importing it (and numpy) here
    if Path(path).suffix.lower().lstrip(".") not in formats:
        raise ReplayError(f"--plot takes a file ending in .{', .'.join(formats)} (png, svg, pdf), got {path!r}")
    if importlib.util.find_spec("matplotlib") is None:
        raise ReplayError("--plot needs matplotlib, which is not installed: pip install 'lr_guard[plot]'")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
