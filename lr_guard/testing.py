"""Test helpers shipped with lr_guard: the detector contract check (and, for callbacks, scripted-loss modules).

``check_detector`` runs the contract every detector must keep; third-party detectors can run it too::

    from lr_guard.testing import check_detector
    check_detector(lambda: MyDetector(warmup_steps=20))
"""

from __future__ import annotations

import copy
import math
import pickle
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from lr_guard.detectors.base import Detector
from lr_guard.events import Event, EventKind, kind_name
from lr_guard.synthetic import make_stream

if TYPE_CHECKING:
    from lr_guard._modules import ScriptedLossModule, TinyRegressionModule

__all__ = ["ScriptedLossModule", "TinyRegressionModule", "check_detector", "contract_stream", "feed"]

_MODULES = ("ScriptedLossModule", "TinyRegressionModule", "regression_data")


def __getattr__(name: str) -> object:
    if name in _MODULES:  # torch and Lightning are imported only when these are asked for
        from lr_guard import _modules

        return getattr(_modules, name)
    raise AttributeError(f"module 'lr_guard.testing' has no attribute {name!r}")


def feed(detector: Detector, values: Sequence[float], start_step: int = 0) -> list[Event]:
    """Feed ``values`` at consecutive steps; return the events raised."""
    events = []
    for i, value in enumerate(values):
        event = detector.update(value, start_step + i)
        if event is not None:
            events.append(event)
    return events


def contract_stream(kind: str, seed: int = 1) -> list[float]:
    """A seeded synthetic stream in which a detector of a built-in ``kind`` has something to find."""
    name = kind_name(kind)
    if name not in {k.value for k in EventKind}:
        raise ValueError(
            f"there is no contract stream for kind {name!r} (only for {', '.join(k.value for k in EventKind)}); "
            "pass check_detector a stream=[...] of 3000 values in which the detector has something to find"
        )
    stream = make_stream(seed, n_steps=3000, inject=name)
    return [float(v) for v in stream.values]


def _same(a: list[Event], b: list[Event]) -> bool:
    def key(e: Event) -> tuple[object, ...]:
        return (
            e.kind,
            e.step,
            e.detector,
            e.message,
            e.threshold,
            "nan" if math.isnan(e.value) else e.value,
            "nan" if math.isnan(e.score) else e.score,
        )

    return [key(e) for e in a] == [key(e) for e in b]


def check_detector(factory: Callable[[], Detector], stream: Sequence[float] | None = None) -> None:
    """Assert the contract shared by every detector; raises ``AssertionError`` naming the broken rule.

    ``stream``: at least 2300 values in which the detector has something to find; by default the contract stream
    of its kind (there is one for each built-in kind; a detector of a new kind must pass its own).

    * ``repr`` names the class and every setting; settings are public attributes named like the arguments.
    * The stream of its kind yields at least one event, none before ``warmup_steps`` values.
    * ``reset()`` gives a detector that behaves exactly like a fresh one.
    * ``pickle`` and ``deepcopy`` give independent detectors that behave the same.
    * NaN, +inf and -inf never raise; detectors other than the divergence detector return no event for them
      and their later events are unchanged.
    * ``state_dict()`` round trip *by behaviour*: feeding a stream with a save/load into a fresh detector in the
      middle gives the same events as feeding it straight; ``load_state_dict`` does not modify its argument.
    """
    detector = factory()
    text = repr(detector)
    _check_declarations(detector, text)
    stream = list(stream) if stream is not None else contract_stream(detector.kind)
    if len(stream) < 2300:
        raise ValueError(f"check_detector needs a stream of at least 2300 values, got {len(stream)}")
    events = feed(factory(), stream)
    assert events, f"{text} found nothing in the {kind_name(detector.kind)} contract stream"
    warmup = int(getattr(detector, "warmup_steps", 0))
    assert all(e.step >= warmup - 1 for e in events if e.kind != EventKind.DIVERGENCE or math.isfinite(e.value)), (
        f"{text} raised an event during warm-up: {events[0]}"
    )
    assert all(e.kind == detector.kind and e.detector == detector.name for e in events)
    assert all(isinstance(e.message, str) and str(e.step) in e.message for e in events)
    _check_copies(factory, stream, events, text)
    _check_non_finite(factory, stream, detector.kind == EventKind.DIVERGENCE, text)


def _check_declarations(detector: Detector, text: str) -> None:
    """The repr shows every setting; kind, signal and the diagnostics' keys are well formed."""
    assert text.startswith(type(detector).__name__ + "("), f"repr should start with the class name: {text}"
    for key, value in detector.settings().items():
        assert f"{key}={value!r}" in text, f"repr should show {key}={value!r}: {text}"
    assert isinstance(detector.kind, str) and detector.kind, f"{text}: kind must be a non-empty string"
    assert isinstance(detector.signal, str) and detector.signal, f"{text}: signal must be a non-empty string"
    for method in (detector.diagnostics, detector.signal_diagnostics):
        assert all(isinstance(k, str) and "/" not in k for k in method()), f"{text}: {method.__name__} keys"


def _check_copies(factory: Callable[[], Detector], stream: list[float], events: list[Event], text: str) -> None:
    """reset(), pickle, deepcopy and a state_dict round trip (at three points) change no event."""
    used = factory()
    feed(used, stream[:1500])
    used.reset()
    assert _same(feed(used, stream), events), f"{text}: reset() did not give a fresh detector"

    half = factory()
    first = feed(half, stream[:1000])
    for clone in (pickle.loads(pickle.dumps(half)), copy.deepcopy(half)):
        assert _same(first + feed(clone, stream[1000:], 1000), events), f"{text}: a copy behaves differently"

    for cut in (7, 1000, 2222):
        head = factory()
        before = feed(head, stream[:cut])
        state = head.state_dict()
        snapshot = pickle.dumps(state)
        fresh = factory()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fresh.load_state_dict(state)
        assert pickle.dumps(state) == snapshot, f"{text}: load_state_dict modified its argument"
        assert _same(before + feed(fresh, stream[cut:], cut), events), (
            f"{text}: events differ after a state_dict round trip at value {cut}"
        )


def _check_non_finite(factory: Callable[[], Detector], stream: list[float], reports_them: bool, text: str) -> None:
    """NaN, +inf and -inf never raise; a divergence detector reports them at once, any other ignores them."""
    poisoned = list(stream)
    bad_at = (1200, 1201, 1202)
    for i, bad in zip(bad_at, (math.nan, math.inf, -math.inf), strict=True):
        poisoned[i] = bad
    poisoned_events = feed(factory(), poisoned)
    if not reports_them:
        assert not any(e.step in bad_at for e in poisoned_events), f"{text} raised an event on a non-finite value"
        clean_stream = [v for i, v in enumerate(stream) if i not in bad_at]
        expected = [e.step for e in feed(factory(), clean_stream)]
        got = [e.step - sum(e.step > b for b in bad_at) for e in poisoned_events]
        assert got == expected, f"{text}: non-finite values changed later events ({got} != {expected})"
    else:
        assert any(e.step == bad_at[0] for e in poisoned_events), f"{text} did not report NaN at once"
