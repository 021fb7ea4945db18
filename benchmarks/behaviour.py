"""Behaviour recorder: what lr_guard's detectors, its policy and the live guard do, as one JSON document.

A refactoring that should change nothing must leave this output unchanged. Record it before, recompute it after,
and compare::

    python benchmarks/behaviour.py --out benchmarks/behaviour_baseline.json      # record
    python benchmarks/behaviour.py --compare benchmarks/behaviour_baseline.json  # recompute, diff, exit 1 if changed
    python benchmarks/behaviour.py --compare FILE --sections detectors replay     # skip the Lightning runs

Sections (only lr_guard's public API is used, so the same script runs against old and new code):

* ``inputs``: length and SHA-256 of every stream fed below (a diff elsewhere is only meaningful if these match).
* ``detectors``: every event of ``SpikeDetector``, ``OscillationDetector``, ``PlateauDetector`` and
  ``DivergenceDetector`` (default settings; also ``space="linear"`` where the detector has it, on the streams with
  zero or negative values), fed ``update(value, step)`` over: the synthetic streams of ``lr_guard.synthetic``
  (``make_suite`` as ``benchmarks/detection.py`` draws it, and ``make_stream`` for every injection kind), every CSV
  of real curves (``--curves``, default ``../shared/curves`` beside the checkout), and odd-value streams (NaN,
  +-inf, zeros, negatives, constants inserted into a healthy decaying stream at fixed positions). Each event is
  ``[step, kind, detector, value, score, threshold, message, sudden]``; the warnings raised and the detector's
  ``n_updates`` / ``n_nonfinite`` at the end are kept too.
* ``replay``: the policy's intents through ``lr_guard.replay.replay`` -- every row ``[step, kind, value, score,
  threshold, action, detail, message]`` and the final LR factor -- for every stream with default settings, for
  settings variations on the streams where the default replay has rows, with LR warm-up series (rising over
  the first 10% -- or 50% -- of the steps, then constant), with the synthetic streams' own LR schedules, and with
  linear-space detectors on the zero/negative streams.
* ``guard``: ``LRGuard`` on real (CPU) Lightning Trainers with scripted losses: every decision ``[step,
  event_step, kind, action, lr_before, lr_after, rollback_to, skip_batches, checkpoint (basename), message]``,
  ``guard.counts``, the final ``global_step`` and LR. Temporary paths in messages read ``<tmpdir>``.

Floats are rounded to 12 significant digits; NaN and infinities are the strings ``"nan"``, ``"inf"``, ``"-inf"``.
``--compare`` matches numbers with a relative tolerance (``--rel-tol``, default 1e-9) and strings exactly, and
prints what changed per section and stream. ``meta`` (versions, timings, counts) is never compared.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import functools
import hashlib
import inspect
import io
import json
import logging
import math
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lr_guard import DivergenceDetector, OscillationDetector, PlateauDetector, SpikeDetector
from lr_guard.replay import replay
from lr_guard.synthetic import INJECTIONS, make_stream, make_suite

FORMAT = 1
SECTIONS = ("inputs", "detectors", "replay", "guard")
DETECTORS: tuple[type, ...] = (SpikeDetector, OscillationDetector, PlateauDetector, DivergenceDetector)
FIELDS = {
    "event": ["step", "kind", "detector", "value", "score", "threshold", "message", "sudden"],
    "replay_row": ["step", "kind", "value", "score", "threshold", "action", "detail", "message"],
    "decision": [
        "step",
        "event_step",
        "kind",
        "action",
        "lr_before",
        "lr_after",
        "rollback_to",
        "skip_batches",
        "checkpoint",
        "message",
    ],
}
# Replay settings tried on every stream whose default replay has rows.
VARIATIONS: dict[str, dict[str, Any]] = {
    "skip_batches=5": {"skip_batches": 5},
    "max_rollbacks=1": {"max_rollbacks": 1},
    "keep_lr_on_bad_batch=False": {"keep_lr_on_bad_batch": False},
    "plateau_factor=None": {"plateau_factor": None},
    "oscillation_factor=None": {"oscillation_factor": None},
    "rollback=False": {"rollback": False},
    "snapshot_every=10,confirm_steps=3": {"snapshot_every": 10, "confirm_steps": 3},
}
RECORD_FIELDS = {"events": FIELDS["event"], "rows": FIELDS["replay_row"], "decisions": FIELDS["decision"]}
DEFAULT_CURVES = Path(__file__).resolve().parents[2] / "shared" / "curves"

Series = list[tuple[int, float]]


# ---------------------------------------------------------------------------------------------- encoding
def num(x: Any) -> Any:
    """A JSON-safe, rounded copy of a number (12 significant digits; non-finite floats as strings)."""
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, (int, np.integer)):
        return int(x)
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(f"{x:.12g}")


def event_record(e: Any) -> list[Any]:
    return [e.step, str(e.kind), e.detector, num(e.value), num(e.score), num(e.threshold), e.message, bool(e.sudden)]


def digest(series: Series) -> dict[str, Any]:
    text = ";".join(f"{s}:{v!r}" for s, v in series)
    return {"n": len(series), "sha256": hashlib.sha256(text.encode()).hexdigest()}


# ---------------------------------------------------------------------------------------------- the streams
def synthetic_streams() -> dict[str, tuple[Series, list[float]]]:
    """Name -> (series, LR schedule): the suites ``benchmarks/detection.py`` draws, and ``make_stream`` variants."""
    out: dict[str, tuple[Series, list[float]]] = {}
    for inject in INJECTIONS:
        kind = inject or "clean"
        for i, s in enumerate(make_suite(inject, 3, seed=0, n_steps=3000)):
            out[f"synthetic/suite/{kind}/{i}"] = (list(enumerate(s.values.tolist())), s.lr.tolist())
        for seed in (10, 11):
            s = make_stream(seed, n_steps=1000, inject=inject)
            out[f"synthetic/stream/{kind}/seed{seed}/n1000"] = (list(enumerate(s.values.tolist())), s.lr.tolist())
    extras = {
        "synthetic/stream/spike/seed3/n500": make_stream(3, n_steps=500, inject="spike"),
        "synthetic/stream/spike/seed5/step-nowarmup-gaussian": make_stream(
            5, inject="spike", schedule="step", warmup_steps=0, noise_df=math.inf
        ),
        "synthetic/stream/oscillation/seed6/constant-warmup150": make_stream(
            6, inject="oscillation", schedule="constant", warmup_steps=150
        ),
        "synthetic/stream/plateau/seed7/cosine-t3": make_stream(7, inject="plateau", schedule="cosine", noise_df=3.0),
        "synthetic/stream/divergence/seed8/step": make_stream(8, inject="divergence", schedule="step"),
    }
    for name, s in extras.items():
        out[name] = (list(enumerate(s.values.tolist())), s.lr.tolist())
    return out


def curve_streams(directory: Path) -> dict[str, Series]:
    """Every ``step,loss`` CSV in ``directory`` ('nan' and 'inf' parse as floats)."""
    out: dict[str, Series] = {}
    for path in sorted(directory.glob("*.csv")):
        with path.open(newline="") as f:
            out[f"curves/{path.stem}"] = [(int(float(r["step"])), float(r["loss"])) for r in csv.DictReader(f)]
    return out


def odd_streams() -> tuple[dict[str, Series], set[str]]:
    """Odd values at fixed positions of a healthy decaying stream; also the names that hold zeros or negatives."""
    n = 1500
    rng = np.random.default_rng(12345)
    clean = [2.0 * (1.0 + 0.01 * t) ** -0.5 for t in range(n)]
    base = [c * math.exp(0.02 * float(z)) for c, z in zip(clean, rng.standard_normal(n), strict=True)]

    def put(changes: dict[int, float]) -> list[float]:
        values = list(base)
        for t, v in changes.items():
            values[t] = v
        return values

    streams: dict[str, list[Any]] = {
        "healthy": list(base),
        "nan_at_500": put({500: math.nan}),
        "posinf_at_500": put({500: math.inf}),
        "neginf_at_500": put({500: -math.inf}),
        "zero_at_500": put({500: 0.0}),
        "negative_at_500": put({500: -0.5}),
        "nan_run_500_to_519": put(dict.fromkeys(range(500, 520), math.nan)),
        "nan_tail_from_1000": put(dict.fromkeys(range(1000, n), math.nan)),
        "zeros_500_to_699": put(dict.fromkeys(range(500, 700), 0.0)),
        "constant_from_500": put(dict.fromkeys(range(500, n), base[500])),
        "constant_all": [1.0] * n,
        "mixed": put({300: math.nan, 400: math.inf, 500: -math.inf, 600: 0.0, 700: -1.0, 800: 1e30, 900: 1e-300}),
        "negative_all": [v - 3.0 for v in base],
        "zero_crossing": [v - clean[750] for v in base],
        "python_ints": [round(10.0 * v) for v in base],
    }
    signed = {"zero_at_500", "negative_at_500", "zeros_500_to_699", "mixed", "negative_all", "zero_crossing"}
    return {f"odd/{k}": list(enumerate(v)) for k, v in streams.items()}, {f"odd/{k}" for k in signed}


def warmup_lr(series: Series, fraction: float, peak: float = 0.1) -> Series:
    """An LR rising linearly over the first ``fraction`` of the values, then constant."""
    n_warm = max(1, int(len(series) * fraction))
    return [(step, peak * min(1.0, (i + 1) / n_warm)) for i, (step, _) in enumerate(series)]


# ---------------------------------------------------------------------------------------------- detectors
def run_detector(factory: Callable[[], Any], series: Series) -> dict[str, Any]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        detector = factory()
        update = detector.update
        events = [event_record(e) for step, value in series if (e := update(value, step)) is not None]
    return {
        "events": events,
        "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
        "n_updates": detector.n_updates,
        "n_nonfinite": detector.n_nonfinite,
    }


def has_space(cls: type) -> bool:
    return "space" in inspect.signature(cls).parameters


def detector_section(streams: dict[str, Series], signed: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, series in streams.items():
        record: dict[str, Any] = {cls.__name__: run_detector(cls, series) for cls in DETECTORS}
        if name in signed:
            for cls in DETECTORS:
                if has_space(cls):
                    record[f"{cls.__name__}[space=linear]"] = run_detector(
                        functools.partial(cls, space="linear"), series
                    )
        out[name] = record
    return out


# ---------------------------------------------------------------------------------------------- replay
def replay_record(
    series: Series, settings: dict[str, Any] | None = None, lr: Sequence[tuple[int, float]] = ()
) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = replay(series, settings=settings, log_every_n_steps=1, lr=list(lr))
    rows = [
        [r.step, str(r.kind), num(r.value), num(r.score), num(r.threshold), str(r.action), r.detail, r.message]
        for r in result.rows
    ]
    return {"rows": rows, "lr_factor": num(result.lr_factor)}


def linear_settings() -> dict[str, Any]:
    return {cls.__name__[: -len("Detector")].lower(): cls(space="linear") for cls in DETECTORS if has_space(cls)}


def replay_section(streams: dict[str, Series], signed: set[str], schedules: dict[str, list[float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, series in streams.items():
        record = {"default": replay_record(series)}
        if record["default"]["rows"]:
            for label, settings in VARIATIONS.items():
                record[label] = replay_record(series, settings)
            record["lr=warmup10%"] = replay_record(series, lr=warmup_lr(series, 0.1))
            record["lr=warmup50%"] = replay_record(series, lr=warmup_lr(series, 0.5))
        if name in schedules:
            record["lr=synthetic_schedule"] = replay_record(series, lr=list(enumerate(schedules[name])))
        if name in signed:
            record["linear_detectors"] = replay_record(series, linear_settings())
        out[name] = record
    return out


# ---------------------------------------------------------------------------------------------- live guard
def decaying(n: int = 400, at: Sequence[int] = (), value: float = math.nan) -> list[float]:
    script = [1.0 / (1.0 + 0.02 * t) for t in range(n)]
    for t in at:
        script[t] = value
    return script


def guard_runs() -> dict[str, Callable[[str], tuple[Any, Any, int]]]:
    """Name -> a function of a temporary directory returning (guard, module, max_steps)."""
    from torch.optim import lr_scheduler as sched

    from lr_guard import LRGuard
    from lr_guard.testing import ScriptedLossModule, TinyRegressionModule

    def quiet_plateau() -> Any:
        return PlateauDetector(patience=20, window=5, noise_sigmas=0, warmup_steps=0)

    def blow_up() -> list[float]:
        script = decaying(n=200)
        for k in range(8):
            script[60 + k] = script[59] * 4.0 ** (k + 1)
        script[68] = math.inf
        return script

    def oscillating() -> list[float]:
        rng = random.Random(0)
        calm = [2.0 * math.exp(rng.gauss(0.0, 0.02)) for _ in range(150)]
        swing = [2.0 * math.exp(0.2 * math.sin(math.pi * t / 3) + rng.gauss(0.0, 0.02)) for t in range(250)]
        return calm + swing

    def spiky() -> list[float]:
        script = decaying()
        script[60], script[70] = 4.0, math.nan
        return script

    def warm(o: Any) -> Any:
        return sched.LambdaLR(o, lambda s: min(1.0, (s + 1) / 40))

    return {
        "nan_mid_steplr": lambda tmp: (
            LRGuard(snapshot_every=20, confirm_steps=5),
            ScriptedLossModule(
                decaying(at=[50]), optimizer="adam", lr=0.01, scheduler=lambda o: sched.StepLR(o, 15, 0.5)
            ),
            80,
        ),
        "nan_twice_same_incident": lambda tmp: (
            LRGuard(snapshot_every=20, confirm_steps=5),
            ScriptedLossModule(decaying(at=[50, 58]), optimizer="adam", lr=0.01),
            80,
        ),
        "blow_up_to_inf": lambda tmp: (
            LRGuard(snapshot_every=10, confirm_steps=3),
            ScriptedLossModule(blow_up(), optimizer="adam", lr=0.01),
            100,
        ),
        "plateau_lr_cut": lambda tmp: (
            LRGuard(plateau=quiet_plateau(), snapshot_every=10, confirm_steps=3, check_every_n_steps=1),
            ScriptedLossModule(decaying(n=30) + [decaying(n=30)[-1]] * 100, lr=0.1),
            80,
        ),
        "oscillation_lr_cut": lambda tmp: (
            LRGuard(),
            ScriptedLossModule(oscillating(), optimizer="adam", lr=0.01),
            400,
        ),
        "failed_start": lambda tmp: (
            LRGuard(
                plateau=quiet_plateau(), snapshot_every=10, confirm_steps=3, max_rollbacks=2, check_every_n_steps=1
            ),
            ScriptedLossModule([2.3], optimizer="adam", lr=0.01),
            120,
        ),
        "exhausted_stop_checkpoint": lambda tmp: (
            LRGuard(snapshot_every=10, confirm_steps=3, max_rollbacks=2, checkpoint_dir=os.path.join(tmp, "ckpt")),
            ScriptedLossModule(decaying(n=40) + [math.nan] * 200, optimizer="adam", lr=0.01),
            200,
        ),
        "skip_batches_3": lambda tmp: (
            LRGuard(snapshot_every=10, confirm_steps=3, skip_batches=3, check_every_n_steps=1),
            ScriptedLossModule(decaying(at=[30]), optimizer="adam", lr=0.01),
            40,
        ),
        "lambdalr_warmup_nan": lambda tmp: (
            LRGuard(snapshot_every=10, confirm_steps=3, check_every_n_steps=1),
            ScriptedLossModule(decaying(at=[25]), optimizer="adam", lr=0.01, scheduler=warm),
            60,
        ),
        "skip_spikes": lambda tmp: (
            LRGuard(skip_spikes=True, snapshot_every=10, confirm_steps=3),
            ScriptedLossModule(spiky(), optimizer="adam", lr=0.01),
            80,
        ),
        "tiny_regression_poisoned": lambda tmp: (
            LRGuard(),
            TinyRegressionModule(lr=0.05, seed=1, poison_steps=[150]),
            250,
        ),
    }


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    names = ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "lr_guard")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def guard_section() -> dict[str, Any]:
    import pytorch_lightning as pl
    import torch

    out: dict[str, Any] = {}
    for name, build in guard_runs().items():
        with tempfile.TemporaryDirectory(prefix="lr_guard_behaviour_") as tmp, quiet_lightning():
            pl.seed_everything(0, verbose=False)
            guard, module, max_steps = build(tmp)
            trainer = pl.Trainer(
                max_steps=max_steps,
                max_epochs=-1,
                accelerator="cpu",
                devices=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                default_root_dir=tmp,
                callbacks=[guard],
            )
            trainer.fit(module)

            def clean(text: str | None, tmp: str = tmp) -> str | None:
                return (
                    None if text is None else text.replace(os.path.realpath(tmp), "<tmpdir>").replace(tmp, "<tmpdir>")
                )

            decisions = [
                [
                    d.step,
                    d.event.step,
                    str(d.event.kind),
                    str(d.action),
                    num(d.lr_before),
                    num(d.lr_after),
                    d.rollback_to,
                    d.skip_batches,
                    None if d.checkpoint is None else os.path.basename(d.checkpoint),
                    clean(d.message),
                ]
                for d in guard.decisions
            ]
            checkpoint = guard.checkpoint_path
            out[name] = {
                "decisions": decisions,
                "counts": {str(k): int(v) for k, v in guard.counts.items()},
                "checkpoint": None if checkpoint is None else os.path.basename(checkpoint),
                "checkpoint_exists": checkpoint is not None and os.path.isfile(checkpoint),
                "global_step": trainer.global_step,
                "final_lr": num(trainer.optimizers[0].param_groups[0]["lr"]),
                "weights_finite": all(bool(torch.isfinite(p).all()) for p in module.parameters()),
            }
    return out


# ---------------------------------------------------------------------------------------------- recording
def record(curves: Path, sections: Sequence[str]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    synthetic = synthetic_streams()
    odd, signed = odd_streams()
    streams: dict[str, Series] = {k: v[0] for k, v in synthetic.items()}
    streams.update(curve_streams(curves))
    streams.update(odd)
    schedules = {k: v[1] for k, v in synthetic.items()}
    seconds["streams"] = time.perf_counter() - t0
    doc: dict[str, Any] = {}
    builders: dict[str, Callable[[], dict[str, Any]]] = {
        "inputs": lambda: {k: digest(v) for k, v in streams.items()},
        "detectors": lambda: detector_section(streams, signed),
        "replay": lambda: replay_section(streams, signed, schedules),
        "guard": guard_section,
    }
    for section in SECTIONS:
        if section in sections:
            t0 = time.perf_counter()
            doc[section] = builders[section]()
            seconds[section] = time.perf_counter() - t0
    import pytorch_lightning as pl

    import lr_guard

    doc["meta"] = {
        "format": FORMAT,
        "fields": FIELDS,
        "lr_guard": lr_guard.__file__,
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": torch.__version__,
            "pytorch_lightning": pl.__version__,
        },
        "curves": str(curves),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "summary": summary(doc),
    }
    return doc


def summary(doc: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "inputs" in doc:
        out["inputs"] = {"streams": len(doc["inputs"]), "values": sum(v["n"] for v in doc["inputs"].values())}
    if "detectors" in doc:
        per: dict[str, int] = {}
        for rec in doc["detectors"].values():
            for label, r in rec.items():
                per[label] = per.get(label, 0) + len(r["events"])
        out["detectors"] = {"streams": len(doc["detectors"]), "events": sum(per.values()), "per_detector": per}
    if "replay" in doc:
        runs = [r for rec in doc["replay"].values() for r in rec.values()]
        actions: dict[str, int] = {}
        for r in runs:
            for row in r["rows"]:
                actions[row[5]] = actions.get(row[5], 0) + 1
        out["replay"] = {
            "streams": len(doc["replay"]),
            "replays": len(runs),
            "rows": sum(actions.values()),
            "per_action": dict(sorted(actions.items())),
        }
    if "guard" in doc:
        actions = {}
        for r in doc["guard"].values():
            for d in r["decisions"]:
                actions[d[3]] = actions.get(d[3], 0) + 1
        out["guard"] = {
            "runs": len(doc["guard"]),
            "decisions": sum(actions.values()),
            "per_action": dict(sorted(actions.items())),
        }
    return out


# ---------------------------------------------------------------------------------------------- comparing
class Comparer:
    def __init__(self, rel_tol: float, abs_tol: float, max_lines: int) -> None:
        self.rel_tol, self.abs_tol, self.max_lines = rel_tol, abs_tol, max_lines

    def same(self, a: Any, b: Any) -> bool:
        if isinstance(a, bool) or isinstance(b, bool):
            return type(a) is type(b) and a == b
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return a == b or math.isclose(a, b, rel_tol=self.rel_tol, abs_tol=self.abs_tol)
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(self.same(x, y) for x, y in zip(a, b, strict=True))
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(self.same(a[k], b[k]) for k in a)
        return type(a) is type(b) and a == b

    def diff(self, a: Any, b: Any, path: str) -> list[str]:
        """Readable lines saying how ``b`` (now) differs from ``a`` (recorded); empty when they are the same."""
        if self.same(a, b):
            return []
        if isinstance(a, dict) and isinstance(b, dict):
            lines: list[str] = []
            for key in [*a, *(k for k in b if k not in a)]:
                where = f"{path} :: {key}"
                if key not in b:
                    lines.append(f"{where}: removed (was {short(a[key])})")
                elif key not in a:
                    lines.append(f"{where}: added ({short(b[key])})")
                else:
                    lines.extend(self.diff(a[key], b[key], where))
            return lines
        if isinstance(a, list) and isinstance(b, list) and any(isinstance(x, (list, dict)) for x in a + b):
            return self.diff_records(a, b, path)
        return [f"{path}: {short(a)} -> {short(b)}"]

    def diff_records(self, a: list[Any], b: list[Any], path: str) -> list[str]:
        """A list of records (events, rows, decisions): ``-`` recorded only, ``+`` computed now only, ``~`` a record
        whose fields changed (named where the record's fields are known)."""

        def key(x: Any) -> str:
            return json.dumps(rounded(x))

        names = RECORD_FIELDS.get(path.rpartition(" :: ")[2], [])
        lines = [f"{path}: {len(a)} recorded, {len(b)} now"]
        body: list[str] = []
        matcher = difflib.SequenceMatcher(None, [key(x) for x in a], [key(x) for x in b], autojunk=False)
        for op, i1, i2, j1, j2 in matcher.get_opcodes():
            if op in ("equal", "replace") and i2 - i1 == j2 - j1:  # changed in place
                for x, y in zip(a[i1:i2], b[j1:j2], strict=True):
                    if not self.same(x, y):
                        body += [f"    ~ was {json.dumps(x)}", f"      now {json.dumps(y)}{self.changed(x, y, names)}"]
                continue
            body += [f"    - {json.dumps(x)}" for x in a[i1:i2]]
            body += [f"    + {json.dumps(y)}" for y in b[j1:j2]]
        if len(body) > self.max_lines:
            body = [*body[: self.max_lines], f"    ... {len(body) - self.max_lines} more lines"]
        return lines + body

    def changed(self, x: Any, y: Any, names: list[str]) -> str:
        if not (isinstance(x, list) and isinstance(y, list) and len(x) == len(y) == len(names)):
            return ""
        fields = [n for n, u, v in zip(names, x, y, strict=True) if not self.same(u, v)]
        return f"  (changed: {', '.join(fields)})"


def rounded(x: Any, digits: int = 9) -> Any:
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, list):
        return [rounded(v, digits) for v in x]
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    return x


def short(x: Any, limit: int = 200) -> str:
    text = json.dumps(x)
    if isinstance(x, (list, dict)) and len(text) > limit:
        return f"{type(x).__name__} of {len(x)}: {text[:limit]}..."
    return text


def compare(old: dict[str, Any], new: dict[str, Any], comparer: Comparer, out: Any) -> bool:
    """Print the differences per section and stream; return whether there were any."""
    changed = False
    print("differences read 'recorded -> now'; in lists '-' is recorded only, '+' now only, '~' changed", file=out)
    for section in [s for s in SECTIONS if s in new]:
        if section not in old:
            print(f"{section}: not in the recorded file (skipped)", file=out)
            continue
        a, b = old[section], new[section]
        keys = [*a, *(k for k in b if k not in a)]
        differ = [k for k in keys if k not in a or k not in b or not comparer.same(a[k], b[k])]
        print(f"{section}: {len(differ)} of {len(keys)} entries differ", file=out)
        for k in differ:
            changed = True
            for line in comparer.diff({k: a[k]} if k in a else {}, {k: b[k]} if k in b else {}, f"  {section}"):
                print(line, file=out)
    skipped = [s for s in SECTIONS if s in old and s not in new]
    if skipped:
        print(f"not recomputed (see --sections): {', '.join(skipped)}", file=out)
    return changed


def print_summary(doc: dict[str, Any], out: Any) -> None:
    meta = doc["meta"]
    print(f"lr_guard from {meta['lr_guard']}", file=out)
    for section, counts in meta["summary"].items():
        seconds = meta["seconds"].get(section, 0.0)
        print(f"{section:<10} {seconds:7.2f} s  {json.dumps(counts)}", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the JSON document here (default: print it)")
    parser.add_argument("--compare", type=Path, help="recompute and diff against this recorded document")
    parser.add_argument("--curves", type=Path, default=DEFAULT_CURVES, help=f"CSV curves (default {DEFAULT_CURVES})")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--rel-tol", type=float, default=1e-9, help="relative tolerance for numbers (default 1e-9)")
    parser.add_argument("--abs-tol", type=float, default=0.0, help="absolute tolerance for numbers (default 0)")
    parser.add_argument("--max-lines", type=int, default=40, help="diff lines shown per changed list (default 40)")
    args = parser.parse_args(argv)
    if not args.curves.is_dir():
        parser.error(f"--curves {args.curves}: no such directory")
    recorded = json.loads(args.compare.read_text()) if args.compare else None
    text_out = sys.stdout if (args.out or args.compare) else sys.stderr
    doc = record(args.curves, args.sections)
    print_summary(doc, text_out)
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
        print(f"written to {args.out}", file=text_out)
    elif recorded is None:
        json.dump(doc, sys.stdout, indent=1, allow_nan=False)
        print()
    if recorded is not None:
        if recorded.get("meta", {}).get("format") != FORMAT:
            print(f"warning: {args.compare} has format {recorded.get('meta', {}).get('format')}, not {FORMAT}")
        changed = compare(recorded, doc, Comparer(args.rel_tol, args.abs_tol, args.max_lines), sys.stdout)
        print("CHANGED" if changed else "no differences")
        return 1 if changed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
