"""The guard callbacks' settings as attributes: each reads and writes the guard's :class:`GuardConfig`, so a
setting changed after construction is validated and takes effect at once (one source of truth)."""

from __future__ import annotations

from typing import Any

from lr_guard.config import GuardConfig

__all__ = ["GuardSettings", "Setting"]


class Setting:
    """A guard attribute that is a :class:`GuardConfig` setting (one source of truth: setting it is validated
    and takes effect at once). ``name``: the config's field, when the attribute has another name."""

    def __init__(self, name: str | None = None) -> None:
        self.field = name

    def __set_name__(self, owner: type, name: str) -> None:
        self.field = self.field or name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return self if obj is None else getattr(obj.config, self.field or "")

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj.config, self.field or "", value)


class _CheckOn(Setting):
    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return self if obj is None else obj.config.watch_on


class GuardSettings:
    """The settings of :class:`GuardConfig` as attributes of a guard (which sets ``self.config``)."""

    config: GuardConfig

    monitor = Setting()
    check_on = _CheckOn()
    plateau_factor = Setting()
    oscillation_factor = Setting()
    rollback = Setting()
    rollback_factor = Setting()
    skip_batches = Setting()
    max_rollbacks = Setting()
    keep_lr_on_bad_batch = Setting()
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
