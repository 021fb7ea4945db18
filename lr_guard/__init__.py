"""lr_guard: keep a training run healthy by itself -- detect loss spikes, oscillation, plateaus and divergence."""

from lr_guard.detectors import (
    Detector,
    DivergenceDetector,
    NullDetector,
    OscillationDetector,
    PlateauDetector,
    SpikeDetector,
)
from lr_guard.events import Event, EventKind

__version__ = "0.1.0"

__all__ = [
    "Detector",
    "DivergenceDetector",
    "Event",
    "EventKind",
    "NullDetector",
    "OscillationDetector",
    "PlateauDetector",
    "SpikeDetector",
    "__version__",
]
