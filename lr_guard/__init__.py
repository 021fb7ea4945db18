"""lr_guard: keep a training run healthy by itself -- detect loss spikes, oscillation, plateaus and divergence,
cut the learning rate, roll back, and say why.

The detectors import no torch; the callbacks (``LRGuard``, ``PlateauLRReducer``, ``DivergenceRollback``, for
``pytorch_lightning``) are imported on first use. For ``lightning.pytorch`` use ``lr_guard.lightning``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lr_guard.detectors import (
    Detector,
    DivergenceDetector,
    NullDetector,
    OscillationDetector,
    PlateauDetector,
    SpikeDetector,
)
from lr_guard.events import Action, Decision, Event, EventKind

if TYPE_CHECKING:
    from lr_guard.actions.gate import UpdateGate
    from lr_guard.callbacks import DivergenceRollback, LRGuard, PlateauLRReducer
    from lr_guard.callbacks.range_sweep import find_lr

__version__ = "0.1.0"

__all__ = [
    "Action",
    "Decision",
    "Detector",
    "DivergenceDetector",
    "DivergenceRollback",
    "Event",
    "EventKind",
    "LRGuard",
    "NullDetector",
    "OscillationDetector",
    "PlateauDetector",
    "PlateauLRReducer",
    "SpikeDetector",
    "UpdateGate",
    "__version__",
    "find_lr",
]

_CALLBACKS = ("LRGuard", "PlateauLRReducer", "DivergenceRollback")


def __getattr__(name: str) -> Any:
    if name == "UpdateGate":  # torch is imported only when it is asked for
        from lr_guard.actions.gate import UpdateGate

        return UpdateGate
    if name == "find_lr":
        from lr_guard.callbacks.range_sweep import find_lr

        return find_lr
    if name in _CALLBACKS:
        from lr_guard import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'lr_guard' has no attribute {name!r}")
