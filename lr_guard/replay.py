"""``lr-guard replay``: what would lr_guard have done on a finished run?

Reads a loss series from a TensorBoard event file or log directory (a scalar tag; by default the training loss
Lightning logged) or from a CSV with ``step,loss`` columns, runs the guard's detectors and rules over it -- the
same :class:`~lr_guard.policy.GuardPolicy` ``LRGuard`` runs, built from the same settings -- and prints every event
with the action the guard would have taken. Optionally writes the guard's diagnostics as a new TensorBoard run
beside the original, so both can be viewed together.

    lr-guard replay lightning_logs/version_3
    lr-guard replay run.csv --set skip_batches=100 --set spike.threshold=7
    lr-guard replay lightning_logs/version_3 --config guard.yaml --tensorboard

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
import functools
import importlib
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    if isinstance(spec, dict) and "class_path" in spec:
        module_name, _, name = str(spec["class_path"]).rpartition(".")
        cls = getattr(importlib.import_module(module_name), name)
        return cls(**{k: _instantiate(v) for k, v in (spec.get("init_args") or {}).items()})
    return spec


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
        value = yaml.safe_load(raw)
        if "." in key:
            detector, _, arg = key.partition(".")
            spec = settings.get(detector)
            if not isinstance(spec, dict):
                class_name = {
                    "spike": "SpikeDetector",
                    "oscillation": "OscillationDetector",
                    "plateau": "PlateauDetector",
                    "divergence": "DivergenceDetector",
                }.get(detector)
                if class_name is None:
                    raise ReplayError(
                        f"--set {item}: {detector!r} is not a detector (spike, oscillation, plateau, divergence)"
                    )
                spec = {"class_path": f"lr_guard.{class_name}", "init_args": {}}
            spec.setdefault("init_args", {})[arg] = value
            settings[detector] = spec
        else:
            settings[key] = value
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


def replay(
    series: Sequence[tuple[int, float]],
    settings: dict[str, Any] | None = None,
    log_every_n_steps: int = 1,
    lr: Sequence[tuple[int, float]] = (),
) -> ReplayResult:
    """Run the guard's rules over ``series``; return what it would have done, and its diagnostics' scalars.

    ``lr``: the run's learning rate as ``(step, lr)`` pairs, sorted by step; where it rises, a warm-up is under
    way (the policy's ``lr_rising``, as the live guard reads it from the optimizer)."""
    from lr_guard.callbacks.core import GuardCore
    from lr_guard.diagnostics import scalars
    from lr_guard.events import Action
    from lr_guard.policy import describe

    settings = dict(settings or {})
    try:
        guard = GuardCore(**{**settings, "verbose": False})
    except (TypeError, ValueError) as err:
        raise ReplayError(f"invalid guard settings: {err}") from err
    policy = guard.policy
    policy.start(series[0][0])
    factor = 1.0
    rows: list[ReplayRow] = []
    logged: list[tuple[int, dict[str, float]]] = []
    next_lr = 0
    for step, value in series:
        # each LR reading once, as the live guard reads the optimizer's: "rising" is against the reading before,
        # and lasts until the next one (a monitor logs the LR every log_every_n_steps, not at every loss value)
        while next_lr < len(lr) and lr[next_lr][0] <= step:
            policy.note_lr(lr[next_lr][1], lr[next_lr][0])
            next_lr += 1
        for intent in policy.observe(step, value):
            before = factor
            detail = ""
            if intent.action in (Action.ROLLBACK, Action.LR_CUT):
                factor *= intent.lr_factor
                detail = f"LR x{intent.lr_factor:g} (cumulative x{factor:.3g})"
                if intent.action == Action.ROLLBACK:
                    detail = f"back to step {intent.rollback_to}, {detail}"
                    if intent.skip_batches:
                        detail += f", skip {intent.skip_batches} batches"
            elif intent.action == Action.STOP:
                detail = f"stop; checkpoint of step {intent.rollback_to}"
            else:
                detail = intent.reason
            message = describe(intent, before, factor, guard.max_rollbacks, policy.incident_rollbacks)
            event = intent.event
            rows.append(
                ReplayRow(
                    step,
                    event.kind.value,
                    event.value,
                    event.score,
                    event.threshold,
                    intent.action.value,
                    detail,
                    message,
                )
            )
            if intent.action == Action.LR_CUT:
                policy.counts["lr_cuts"] += 1
        if step % log_every_n_steps == 0:
            groups = [("opt0_group0", {"lr": factor, "lr_guard_factor": factor})]
            metrics = scalars(value, guard.detectors, groups, policy.counts)
            metrics.pop("lr_guard/lr/opt0_group0", None)  # no learning rate is known offline, only the factor
            logged.append((step, metrics))
        if policy.wants_snapshot(step + 1):
            policy.snapshot_taken(step + 1)
        if policy.stopped:
            break
    return ReplayResult(rows, len(series), factor, guard.settings(), logged)


def write_tensorboard(result: ReplayResult, out_dir: str | os.PathLike[str]) -> str:
    """Write the replay's scalars, decisions, configuration and dashboard layout as a TensorBoard run."""
    from torch.utils.tensorboard import SummaryWriter

    from lr_guard.diagnostics import CONFIG_TAG, DECISIONS_TAG, config_markdown, layout

    writer = SummaryWriter(log_dir=str(out_dir))
    try:
        writer.add_custom_scalars(layout())
        writer.add_text(CONFIG_TAG, config_markdown(result.settings), 0)
        for step, metrics in result.scalars:
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, step)
        for row in result.rows:
            writer.add_text(DECISIONS_TAG, f"**step {row.step}: {row.kind} → {row.action}**\n\n{row.message}", row.step)
    finally:
        writer.close()
    return str(out_dir)


def format_table(result: ReplayResult) -> str:
    header = f"{'step':>8}  {'event':<11} {'value':>10} {'score':>9} {'thresh':>7}  {'action':<9} detail"
    lines = [header, "-" * len(header)]
    for r in result.rows:
        lines.append(
            f"{r.step:>8}  {r.kind:<11} {r.value:>10.4g} {r.score:>9.3g} {r.threshold:>7.3g}  {r.action:<9} {r.detail}"
        )
    if not result.rows:
        lines.append("(no events: the guard would have done nothing)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lr-guard", description="lr_guard's command-line tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    rp = sub.add_parser(
        "replay",
        help="what would lr_guard have done on a finished run?",
        description=__doc__,
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
    rp.add_argument("--json", action="store_true", help="print the events as JSON instead of a table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        series, tag, source = load_series(args.path, args.tag)
        lr, lr_tag = load_lr_series(args.path, args.lr_tag)
        result = replay(series, guard_settings(args.config, args.set), lr=lr)
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
        print(format_table(result))
        actions = [r.action for r in result.rows]
        print(
            f"\n{len(result.rows)} event(s); {actions.count('rollback')} rollback(s), "
            f"{actions.count('lr_cut')} LR cut(s), stop: {'yes' if 'stop' in actions else 'no'}; "
            f"final LR factor x{result.lr_factor:.3g}"
        )
    if args.tensorboard is not None:
        base = Path(args.path)
        out = args.tensorboard or str((base if base.is_dir() else base.parent) / "lr_guard_replay")
        print(
            f"diagnostics written to {write_tensorboard(result, out)}; view both with: "
            f"tensorboard --logdir {Path(out).parent}"
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
