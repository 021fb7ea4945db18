"""The guard's settings, validated in one place, and the detectors they name (pure Python).

``LRGuard``, the single-job callbacks (presets of the same settings) and ``lr-guard replay`` all build their
:class:`~lr_guard.policy.GuardPolicy` from one :class:`GuardConfig` and one :func:`build_detectors`, so a setting
means the same everywhere and is checked the same way. A ``GuardConfig`` validates every assignment, not only
the constructor's: ``guard.rollback_factor = 2.0`` raises as ``LRGuard(rollback_factor=2.0)`` does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from lr_guard.detectors.base import Detector, NullDetector, check_choice, check_number
from lr_guard.detectors.divergence import DivergenceDetector
from lr_guard.detectors.oscillation import OscillationDetector
from lr_guard.detectors.plateau import PlateauDetector
from lr_guard.detectors.spike import SpikeDetector

__all__ = [
    "BUILT_IN_DETECTORS",
    "GuardConfig",
    "build_detectors",
    "check_setting",
    "per_group_floors",
    "run_sized_plateau",
    "sized_detector",
]

# The detectors LRGuard's keyword switches name, in the order they are fed (and logged)
BUILT_IN_DETECTORS: dict[str, type[Detector]] = {
    "spike": SpikeDetector,
    "oscillation": OscillationDetector,
    "plateau": PlateauDetector,
    "divergence": DivergenceDetector,
}


def _factor(allow_none: bool) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if value is None and allow_none:
            return None
        check_number(name, value, low=0.0, high=1.0, low_open=True, high_open=True)
        return float(value)

    return check


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _count(low: int, optional: bool = False) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if value is None and optional:
            return None
        check_number(name, value, low=low, integer=True)
        return int(value)  # a NumPy integer is stored as the int it is

    return check


SWEEP_MIN_STEPS = 10  # the fewest steps of an in-run LR sweep (as find_lr's num_steps)


def _sweep_steps(name: str, value: Any) -> int:
    check_number(name, value, low=0, integer=True)
    if value != 0 and value < SWEEP_MIN_STEPS:
        raise ValueError(
            f"{name} must be 0 (no sweep) or >= {SWEEP_MIN_STEPS} (steps of the range test), got {value!r}"
        )
    return int(value)


def _choice(choices: tuple[str, ...], optional: bool = False) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if value is None and optional:
            return None
        check_choice(name, value, choices)
        return value

    return check


def _path(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path or None, got {value!r}")
    return os.fspath(value)


def _min_lr(name: str, value: Any) -> float | list[float]:
    if isinstance(value, (list, tuple)):
        for i, m in enumerate(value):
            check_number(f"{name}[{i}]", m, low=0.0)
        return [float(m) for m in value]
    check_number(name, value, low=0.0)
    return float(value)


def _eps(name: str, value: Any) -> float:
    check_number(name, value, low=0.0)
    return float(value)


def _raise(name: str, value: Any) -> float:
    check_number(name, value, low=1.0, low_open=True)
    return float(value)


def _monitor(name: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{name} must be None (the training loss) or a metric name, got {value!r}")
    return value


# each check takes the name to report (the setting's, or a callback's own name for it) and the value
_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "monitor": _monitor,
    "check_on": _choice(("train_step", "validation"), optional=True),
    "plateau_factor": _factor(allow_none=True),
    "oscillation_factor": _factor(allow_none=True),
    "rollback": _flag,
    "rollback_factor": _factor(allow_none=False),
    "skip_batches": _count(0),
    "max_rollbacks": _count(0),
    "keep_lr_on_bad_batch": _flag,
    "warmup_cap_factor": _factor(allow_none=True),
    "skip_spikes": _flag,
    "snapshot_every": _count(1),
    "confirm_steps": _count(1),
    "check_every_n_steps": _count(1),
    "min_lr": _min_lr,
    "eps": _eps,
    "checkpoint_dir": _path,
    "snapshot_device": _choice(("cpu", "same", "disk")),
    "snapshot_memory_budget": _count(0, optional=True),
    "snapshot_dir": _path,
    "diagnostics": _flag,
    "log_every_n_steps": _count(1, optional=True),
    "verbose": _flag,
    "dry_run": _flag,
    "lr_search": _flag,
    "lr_search_factor": _raise,
    "lr_search_window": _count(6),
    "lr_search_sweep_steps": _sweep_steps,
}


def check_setting(field: str, value: Any, name: str | None = None) -> Any:
    """``value`` checked (and normalised) as the setting ``field``; an error names it ``name``, a callback's own
    name for the setting (``PlateauLRReducer``'s ``factor`` is the ``plateau_factor``), or ``field``."""
    return _CHECKS[field](name or field, value)


@dataclass
class GuardConfig:
    """Every setting of the guard except its detectors; the meaning of each is documented on ``LRGuard``.

    Each value is checked when it is set (also after construction), with an error naming the setting, what it
    may be and what it got. ``check_on=None`` resolves to ``"train_step"`` without ``monitor`` and
    ``"validation"`` with it (:attr:`watch_on`; a live guard chooses by where the metric is logged). ``version``
    counts the changes made (for readers that cache).
    """

    version: ClassVar[int] = 0  # per instance once a setting is set

    monitor: str | None = None
    check_on: str | None = None
    plateau_factor: float | None = 0.5
    oscillation_factor: float | None = 0.5
    rollback: bool = True
    rollback_factor: float = 0.5
    skip_batches: int = 0
    max_rollbacks: int = 3
    keep_lr_on_bad_batch: bool = True
    warmup_cap_factor: float | None = 0.1
    skip_spikes: bool = False
    snapshot_every: int = 50
    confirm_steps: int = 10
    check_every_n_steps: int = 8
    min_lr: float | list[float] = 0.0
    eps: float = 1e-8
    checkpoint_dir: str | None = None
    snapshot_device: str = "cpu"
    snapshot_memory_budget: int | None = None
    snapshot_dir: str | None = None
    diagnostics: bool = True
    log_every_n_steps: int | None = None
    verbose: bool = True
    dry_run: bool = False
    lr_search: bool = False
    lr_search_factor: float = 2.0
    lr_search_window: int = 20
    lr_search_sweep_steps: int = 30

    def __setattr__(self, name: str, value: Any) -> None:
        check = _CHECKS.get(name)
        if check is None:
            raise AttributeError(f"GuardConfig has no setting {name!r}; the settings are: {', '.join(_CHECKS)}")
        object.__setattr__(self, name, check(name, value))
        object.__setattr__(self, "version", getattr(self, "version", 0) + 1)  # readers of settings see a change

    @property
    def watch_on(self) -> str:
        """Where the watched value is read: ``check_on``, or its default for ``monitor``."""
        if self.check_on is not None:
            return self.check_on
        return "train_step" if self.monitor is None else "validation"

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> GuardConfig:
        """The config of the ``GuardConfig`` fields in ``settings`` (other keys are ignored)."""
        known = set(cls.names())
        return cls(**{k: v for k, v in settings.items() if k in known})


def _switch(slot: str, value: Detector | bool) -> Detector:
    cls = BUILT_IN_DETECTORS[slot]
    if isinstance(value, bool):
        return cls() if value else NullDetector(name=f"{slot} (off)")
    if isinstance(value, (cls, NullDetector)):
        return value
    if isinstance(value, Detector):
        raise TypeError(
            f"{slot} must be a {cls.__name__}, True or False; got a {type(value).__name__}. Pass a detector of "
            f"another class in detectors=[...]: its kind ({value.kind!r}) chooses what the guard does about it"
        )
    raise TypeError(f"{slot} must be a {cls.__name__}, True or False; got {value!r}")


def build_detectors(switches: Mapping[str, Detector | bool], extra: Iterable[Detector] = ()) -> dict[str, Detector]:
    """The guard's detectors by slot name: the built-in ones from their keyword switches (``True`` for the
    default, ``False`` off, or a configured instance), then each of ``extra`` under its own ``name``."""
    detectors = {slot: _switch(slot, switches.get(slot, True)) for slot in BUILT_IN_DETECTORS}
    if isinstance(extra, Detector):
        extra = [extra]
    for detector in extra:
        if not isinstance(detector, Detector):
            raise TypeError(
                f"detectors must hold lr_guard Detector instances (subclass lr_guard.Detector); got {detector!r}"
            )
        if detector.name in detectors:
            raise ValueError(
                f"two detectors are named {detector.name!r}; give each of detectors=[...] its own name= "
                f"(the names in use: {', '.join(detectors)})"
            )
        if any(detector is d for d in detectors.values()):
            raise ValueError(f"the detector {detector!r} is passed twice; each detector object is used once")
        detectors[detector.name] = detector
    return detectors


def run_sized_plateau(max_steps: int) -> PlateauDetector:
    """The default plateau detector sized to a run of ``max_steps`` optimizer steps: its patience (a third of the
    steps seen so far, at least 25) is at most a quarter of the run, clamped to 100..5000 steps, so a plateau is
    found while the run can still act on it."""
    return PlateauDetector(max_patience=min(5000, max(100, max_steps // 4)))


# The per-validation plateau rule: torch's state machine on the value itself (window 1), patience 5 values, and an
# improvement must beat the best by half the run's typical change from one value to the next (its pace and its
# noise together), not by a fixed 1%; chosen by measurement (``python benchmarks/detection.py``, the per-epoch suite,
# and the ResNet-110 curve in ``tests/test_detectors.py``).
VALIDATION_PLATEAU: dict[str, Any] = {"patience": 5, "threshold": 0.0, "window": 1, "noise_sigmas": 0.5}


def validation_plateau() -> PlateauDetector:
    """The default plateau detector for one value per validation run (or epoch): torch's ``ReduceLROnPlateau``
    state machine on the value itself with patience 5 values, where an improvement must beat the best by more
    than half the run's own typical change from one value to the next (``noise_sigmas=0.5`` of the robust scale
    ``0.886 * EMA(|dx|)``, which holds both the run's pace and its noise) instead of torch's fixed relative 1e-2.
    A run that still moves by its usual steps is not on a plateau however slowly it improves in relative terms;
    one whose values stop beating the best by that much for 5 validations is. torch's own defaults (10, 1e-4) never
    fire on the per-epoch ResNet-110 curve before its hand-set decay at 81; this rule fires at epoch 47 (and at 64
    if the log starts 3-15 epochs later), and on clean synthetic per-epoch runs it raises about half the false
    plateaus of (5, 1e-2)."""
    return PlateauDetector(**VALIDATION_PLATEAU, warmup_steps=0)


def validation_divergence() -> DivergenceDetector:
    """The default divergence detector for one value per validation run. A validation value is an average over a
    data set, not one batch: a NaN or a 10x blow-up counts at once, 2x the best for two validations in a row
    counts, and there is no trend test (a validation loss that creeps up is overfitting, not divergence)."""
    return DivergenceDetector(smoothing_window=1, patience=2, trend_window=0, warmup_steps=1, instant_confirm=0)


def sized_detector(slot: str, watch_on: str, total_steps: int | None) -> Detector | None:
    """The default detector of ``slot`` for a run watched at ``watch_on`` (``"train_step"`` or ``"validation"``)
    and ``total_steps`` optimizer steps long (``None``: unknown), or ``None`` where the constructor's default fits.

    Per step, the plateau detector is sized to the run (:func:`run_sized_plateau`); per validation, the plateau
    and divergence detectors count in validations (:func:`validation_plateau`, :func:`validation_divergence`)."""
    if watch_on == "validation":
        if slot == "plateau":
            return validation_plateau()
        if slot == "divergence":
            return validation_divergence()
        return None
    if slot == "plateau" and total_steps is not None and total_steps > 0:
        return run_sized_plateau(total_steps)
    return None


def per_group_floors(min_lr: float | Sequence[float], groups_per_optimizer: Sequence[int]) -> list[Any]:
    """``min_lr`` split per optimizer (one value for all, or one per param group of every optimizer in order)."""
    if not isinstance(min_lr, list):
        return [min_lr] * len(groups_per_optimizer)
    if len(min_lr) != sum(groups_per_optimizer):
        raise ValueError(
            f"min_lr has {len(min_lr)} values but the optimizers have {sum(groups_per_optimizer)} param groups "
            "in all; give one value, or one per group"
        )
    floors, out = iter(min_lr), []
    for n in groups_per_optimizer:
        out.append([next(floors) for _ in range(n)])
    return out
