"""Framework-free streaming detectors (no torch import): feed ``update(value, step)``, get an ``Event`` or ``None``."""

from lr_guard.detectors.base import Detector, NullDetector
from lr_guard.detectors.divergence import DivergenceDetector
from lr_guard.detectors.oscillation import OscillationDetector
from lr_guard.detectors.plateau import PlateauDetector
from lr_guard.detectors.spike import SpikeDetector

__all__ = ["Detector", "DivergenceDetector", "NullDetector", "OscillationDetector", "PlateauDetector", "SpikeDetector"]
