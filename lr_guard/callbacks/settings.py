"""The guard callbacks' settings as attributes: each reads and writes the guard's :class:`GuardConfig`, so a
setting changed after construction is validated and takes effect at once (one source of truth)."""

from __future__ import annotations

import inspect
from typing import Any

from lr_guard.config import GuardConfig, check_setting
from lr_guard.detectors import Detector

__all__ = ["GuardSettings", "Setting"]


class Setting:
    """A guard attribute that is a :class:`GuardConfig` setting (one source of truth: setting it is validated
    and takes effect at once). ``name``: the config's field, when the attribute has another name."""

    def __init__(self, name: str | None = None) -> None:
        self.field = name
        self.name = name

    def __set_name__(self, owner: type, name: str) -> None:
        self.field = self.field or name
        self.name = name  # errors name the attribute as the user wrote it (``factor``), not the config's field

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return self if obj is None else getattr(obj.config, self.field or "")

    def __set__(self, obj: Any, value: Any) -> None:
        field = self.field or ""
        if self.name != field:
            value = check_setting(field, value, self.name)
        setattr(obj.config, field, value)


class _CheckOn(Setting):
    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return self if obj is None else obj.watch_on


class GuardSettings:
    """The settings of :class:`GuardConfig` as attributes of a guard (which sets ``self.config``)."""

    config: GuardConfig
    extra_detectors: list[Detector]

    @property
    def detectors(self) -> dict[str, Detector]:  # the guard's own
        raise NotImplementedError

    @property
    def watch_on(self) -> str | None:
        """What ``check_on`` reads: where the watched value is read (the guard may choose it during a run)."""
        return self.config.watch_on

    monitor = Setting()
    check_on = _CheckOn()
    plateau_factor = Setting()
    oscillation_factor = Setting()
    rollback = Setting()
    rollback_factor = Setting()
    skip_batches = Setting()
    max_rollbacks = Setting()
    keep_lr_on_bad_batch = Setting()
    warmup_cap_factor = Setting()
    skip_spikes = Setting()
    snapshot_every = Setting()
    confirm_steps = Setting()
    check_every_n_steps = Setting()
    min_lr = Setting()
    eps = Setting()
    checkpoint_dir = Setting()
    snapshot_device = Setting()
    snapshot_memory_budget = Setting()
    snapshot_dir = Setting()
    diagnostics = Setting()
    log_every_n_steps = Setting()
    verbose = Setting()
    dry_run = Setting()
    lr_search = Setting()
    lr_search_factor = Setting()
    lr_search_window = Setting()
    lr_search_sweep_steps = Setting()

    def settings(self) -> dict[str, Any]:
        """The constructor's arguments (detectors as their repr), as recorded in the configuration entry."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        out: dict[str, Any] = {}
        for name in names:
            if name == "detectors":
                out[name] = [repr(d) for d in self.extra_detectors]
                continue
            value = self.detectors[name] if name in self.detectors else getattr(self, name, None)
            out[name] = repr(value) if isinstance(value, Detector) else value
        return out

    @property
    def state_key(self) -> str:
        # Lightning reads this on every hook call (for its profiler): build it once.
        key = self.__dict__.get("_state_key")
        if key is None:
            key = f"{type(self).__qualname__}{{'monitor': {self.monitor!r}, 'check_on': {self.config.watch_on!r}}}"
            self.__dict__["_state_key"] = key
        return key
