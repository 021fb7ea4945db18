"""The detector contract shared by every streaming detector.

A detector is a small stateful object fed one value at a time. Settings are public attributes named exactly
like the ``__init__`` arguments; state is private, listed in ``_STATE_FIELDS`` and built in ``_reset()``.
``state_dict()`` carries the state only (plus a version and a record of the settings, used to warn when a
checkpoint was written with other settings); the constructor's settings always win.
"""

from __future__ import annotations

import abc
import copy
import functools
import inspect
import math
import numbers
import warnings
from collections import deque
from collections.abc import Iterable
from typing import Any, ClassVar

from lr_guard.events import Event

__all__ = ["Detector", "NullDetector"]

_SPACES = ("log", "linear")
_IMMUTABLE = (int, float, bool, str, type(None))  # state values that need no copy


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``value`` is a number in the given range."""
    kind = "an int" if integer else "a number"
    # NumPy's numbers count (np.int64 is an Integral, np.float32 a Real); bools and tensors do not
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or (integer and not isinstance(value, numbers.Integral))
    ):
        raise TypeError(f"{name} must be {kind}, got {value!r} of type {type(value).__name__}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and high is not None:  # a two-sided range: name it whole
        outside = (x <= low if low_open else x < low) or (x >= high if high_open else x > high)
        if outside:
            interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise ValueError(f"{name} must be in {interval}, got {value!r}")
        return
    if low is not None and (x <= low if low_open else x < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (x >= high if high_open else x > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")


def to_float(value: Any) -> float:
    """Convert a loss value (float, int, NumPy or 0-d tensor scalar) to a Python float."""
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"update() takes a number for value, got {value!r} of type {type(value).__name__}") from err


@functools.cache
def _init_arguments(cls: type) -> tuple[str, ...]:
    """The names of a class's ``__init__`` arguments (read once per class: a snapshot records them)."""
    return tuple(p for p in inspect.signature(cls).parameters)  # the class signature: __init__ without self


class Detector(abc.ABC):
    """Base class: a streaming detector fed ``update(value, step)``, returning an :class:`Event` or ``None``.

    A detector declares what it is and what it reads, so the guard can use any detector without knowing it:

    * ``kind`` (a class attribute): the kind of trouble it reports, which chooses the guard's response. The
      built-in kinds are the :class:`EventKind` members: ``"divergence"`` rolls back, ``"plateau"`` and
      ``"oscillation"`` cut the LR, ``"spike"`` is logged; any other string is a new kind, counted and logged.
    * ``name``: which detector it is (in events, counts of the decision log and diagnostics' tags).
    * ``signal``: the named signal it is fed, ``"loss"`` (the watched loss or metric) by default.
    * :meth:`diagnostics` / :meth:`signal_diagnostics` / :meth:`charts`: the scalars it reports to TensorBoard
      and the dashboard charts that show them.

    Non-finite values (NaN, +-inf) follow one policy everywhere: the divergence detector reports them; every
    other detector ignores them (its statistics are left untouched) and counts them in ``n_nonfinite``.
    """

    kind: ClassVar[str]
    tracks_progress: ClassVar[bool] = False  # True: ``progress`` says how far training got (see the policy)
    # Settings that count values, and per-value decay rates: fed one value a step, both mean steps. A replay of a
    # log that holds every k-th step divides the counts by k (rounded up) and raises the decays to the power k.
    value_counts: ClassVar[tuple[str, ...]] = ()
    value_decays: ClassVar[tuple[str, ...]] = ()
    STATE_VERSION: ClassVar[int] = 1
    _STATE_FIELDS: ClassVar[tuple[str, ...]] = ()

    def scaled_counts(self) -> tuple[str, ...]:
        """The settings of this detector that count steps (its ``value_counts``): a replay of a log that holds
        every k-th step divides them by k. A detector whose counts are sample sizes for some settings says so
        here."""
        return type(self).value_counts

    def __init__(self, name: str | None = None, signal: str = "loss") -> None:
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name must be a non-empty string or None, got {name!r}")
        if not isinstance(signal, str) or not signal or "/" in signal:
            raise ValueError(f"signal must be a non-empty name without '/', e.g. 'loss'; got {signal!r}")
        kind = getattr(type(self), "kind", None)
        if not isinstance(kind, str) or not kind:
            raise TypeError(f"{type(self).__name__} must set the class attribute kind to a string, e.g. 'spike'")
        self.name = name if name is not None else type(self).__name__
        self.signal = signal
        self._reset()

    # -- the contract -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def update(self, value: float, step: int) -> Event | None:
        """Feed one value observed at ``step``; return an :class:`Event` when something is found."""

    @abc.abstractmethod
    def _reset(self) -> None:
        """Build all private state from the settings."""

    def reset(self) -> None:
        """Forget everything seen so far; the detector is as freshly constructed."""
        self._reset()

    def rearm(self) -> None:
        """The event just raised was answered without the rollback that would reset this detector (the step's
        update was skipped): be ready to raise the next one. A detector that raises one event per episode (a
        divergence latched until the loss recovers) forgets that episode here; the default does nothing."""
        return None

    @property
    def quiet(self) -> bool:
        """``True`` unless something is building up or under way (an excursion, a count towards an alarm, a
        latched alarm). A training state taken while every detector is quiet is a candidate "good" state."""
        return True

    @property
    def progress(self) -> float:
        """How far the watched value has improved on its first value, relative to it (0.3: 30% better); NaN
        when unknown. Read only from a detector whose class sets ``tracks_progress = True``."""
        return math.nan

    # -- what it reports -----------------------------------------------------------------------------------------
    def diagnostics(self) -> dict[str, float]:
        """Scalars about the detector itself, logged as ``lr_guard/<name>/<key>`` (its slot name in the guard)."""
        return {}

    def signal_diagnostics(self) -> dict[str, float]:
        """Scalars about the signal it reads (e.g. its trend), logged as ``lr_guard/<signal>/<key>``."""
        return {}

    def charts(self) -> dict[str, list[str]]:
        """Dashboard charts: title -> tags below ``lr_guard/``, with ``{slot}`` and ``{signal}`` filled in; a list
        starting with ``"Margin"`` is a band chart (value, lower, upper). By default a score/threshold chart when
        :meth:`diagnostics` reports both."""
        keys = self.diagnostics()
        if "score" in keys and "threshold" in keys:
            return {"{slot}: score vs threshold": ["{slot}/score", "{slot}/threshold"]}
        return {}

    @property
    def n_updates(self) -> int:
        """Number of finite values taken into the statistics so far."""
        return int(getattr(self, "_n", 0))

    @property
    def n_nonfinite(self) -> int:
        """Number of non-finite values seen so far."""
        return int(getattr(self, "_n_nonfinite", 0))

    # -- settings, repr ------------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The constructor's arguments, as public attributes of the same names."""
        return {p: getattr(self, p) for p in _init_arguments(type(self))}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"

    # -- state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counters and statistics (no settings apply on load), with a version; safe to pickle or ``torch.save``."""
        state: dict[str, Any] = {}
        for field in self._STATE_FIELDS:
            value = getattr(self, field)
            if isinstance(value, deque):
                state[field] = list(value)
            elif isinstance(value, NoiseScale):
                state[field] = value.to_dict()
            elif type(value) in _IMMUTABLE:
                state[field] = value
            else:
                state[field] = copy.deepcopy(value)
        return {
            "version": self.STATE_VERSION,
            "detector": type(self).__name__,
            "settings": self.settings(),
            "state": state,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore state saved by :meth:`state_dict`; the argument is not modified.

        The detector keeps its own settings; if the checkpoint was written with other settings a warning says so.
        Keys missing from an older checkpoint keep their fresh values.
        """
        if not isinstance(state_dict, dict) or "state" not in state_dict:
            raise ValueError(
                f"{self.name}: not a detector state_dict (expected a dict with a 'state' key), "
                f"got {type(state_dict).__name__}"
            )
        kind = state_dict.get("detector", type(self).__name__)
        if kind != type(self).__name__:
            raise ValueError(
                f"{self.name}: state_dict was written by a {kind}, cannot load it into a {type(self).__name__}"
            )
        version = state_dict.get("version", self.STATE_VERSION)
        if version > self.STATE_VERSION:
            raise ValueError(
                f"{self.name}: state_dict version {version} is newer than this lr_guard supports "
                f"({self.STATE_VERSION}); upgrade lr_guard to load it"
            )
        saved_settings = state_dict.get("settings", {})
        differ = {
            k: (v, getattr(self, k))
            for k, v in saved_settings.items()
            if k != "name" and hasattr(self, k) and getattr(self, k) != v
        }
        if differ:
            text = ", ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in differ.items())
            warnings.warn(
                f"{self.name}: loading state saved with other settings ({text}); keeping the constructor's settings",
                UserWarning,
                stacklevel=2,
            )
        self._reset()
        for field, value in state_dict["state"].items():
            if field not in self._STATE_FIELDS:
                continue
            current = getattr(self, field)
            value = copy.deepcopy(value)
            if isinstance(current, deque):
                setattr(self, field, deque(value, maxlen=current.maxlen))
            elif isinstance(current, NoiseScale):
                current.load_dict(value)
            else:
                setattr(self, field, value)


class NullDetector(Detector):
    """A detector that never reports anything: the stand-in when a kind of detection is switched off."""

    kind = "off"  # it raises no events

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)

    def _reset(self) -> None:
        pass

    def update(self, value: float, step: int) -> Event | None:
        to_float(value)
        return None


class LogOrLinear:
    """The value space a detector works in, chosen once.

    ``"log"``: ``y = log(value)``, so thresholds are relative and fit losses of any scale; values <= 0 cannot be
    placed there and are skipped (with one warning per detector) -- use ``"linear"`` for losses that can be zero
    or negative. ``"linear"``: ``y = value``; noise is still estimated from the data, so thresholds in robust
    sigmas stay scale-free, but factor rules (``"2x the best"``) become differences of ``log(factor)`` units.
    """

    def __init__(self, space: str, owner: str) -> None:
        check_choice("space", space, _SPACES)
        self.log = space == "log"
        self.owner = owner
        self.warned = False

    def __call__(self, value: float) -> float | None:
        if value > 0.0 and self.log:
            return math.log(value)
        if not self.log:
            return value
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"{self.owner}: got {value!r} <= 0 in space='log'; such values are skipped. "
                "Use space='linear' for losses that can be zero or negative.",
                UserWarning,
                stacklevel=3,
            )
        return None

    def inverse(self, y: float) -> float:
        """Back from the detector's space to the loss's units."""
        return safe_exp(y) if self.log else y

    def ratio(self, difference: float) -> float:
        """A difference in the detector's space as the user reads it: a ratio in log space, else the difference."""
        return safe_exp(difference) if self.log else difference


def median(values: Iterable[float]) -> float:
    """Median of a short sequence (faster than ``statistics.median`` or numpy for the few values used here)."""
    ordered = sorted(values)
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def safe_exp(x: float) -> float:
    """``exp(x)``, but ``inf`` instead of an ``OverflowError``."""
    return math.exp(x) if x < 709.0 else math.inf


class NoiseScale:
    """Robust noise scale of a stream from its first differences: ``0.886 * EMA(|dy|)``.

    For Gaussian noise of standard deviation s, ``E|dy| = 2s/sqrt(pi)``, so ``0.886 * E|dy|`` estimates s without
    being inflated by the trend. Each ``|dy|`` is clipped at ``clip`` times the current mean before it enters the
    average, so one spike cannot inflate the scale it is measured against; clipping starts after ``MIN_COUNT``
    differences, so a first difference of zero cannot freeze the scale at zero. Bias-corrected like Adam's moments.
    """

    MIN_COUNT = 10
    __slots__ = ("alpha", "clip", "count", "mean", "sigma", "weight")

    def __init__(self, alpha: float, clip: float) -> None:
        self.alpha = alpha
        self.clip = clip
        self.mean = 0.0
        self.weight = 0.0
        self.count = 0
        self.sigma = 0.0  # the estimate, kept up to date by update(): read on every value by every detector

    def update(self, abs_diff: float) -> None:
        count = self.count
        if count >= self.MIN_COUNT:
            cap = self.clip * self.mean / self.weight
            if abs_diff > cap:
                abs_diff = cap
        self.count = count + 1
        alpha = self.alpha
        self.mean = mean = alpha * self.mean + (1.0 - alpha) * abs_diff
        self.weight = weight = alpha * self.weight + (1.0 - alpha)
        self.sigma = 0.886 * mean / weight

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "weight": self.weight, "count": self.count}

    def load_dict(self, state: dict[str, float]) -> None:
        self.mean = float(state["mean"])
        self.weight = float(state["weight"])
        self.count = int(state.get("count", self.MIN_COUNT))
        self.sigma = 0.886 * self.mean / self.weight if self.weight > 0.0 else 0.0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoiseScale) and self.to_dict() == other.to_dict()
