"""The guard's logic, written once for both Lightning namespaces.

``pytorch_lightning`` and ``lightning.pytorch`` publish the same ``Trainer``, but each Trainer rejects callbacks
that subclass the other's ``Callback``. The hooks here only use the Trainer's public API, so the public classes
(``lr_guard.LRGuard`` for ``pytorch_lightning``, ``lr_guard.lightning.LRGuard`` for ``lightning.pytorch``) are
this class plus the namespace's ``Callback`` base, and nothing else.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch

from lr_guard.actions import (
    HostScalars,
    Snapshot,
    compose_with_scheduler,
    cut_lr,
    drop_gradients,
    lr_factors,
    release_scheduler,
    restore_buffers,
    save_buffers,
    set_lr_factors,
    set_min_lr,
    take_snapshot,
)
from lr_guard.actions.disk_snapshot import DiskSnapshot, remove_snapshot_files, take_disk_snapshot
from lr_guard.actions.lr import UNSCALED
from lr_guard.actions.snapshot import tree_nbytes
from lr_guard.detectors import (
    Detector,
    DivergenceDetector,
    NullDetector,
    OscillationDetector,
    PlateauDetector,
    SpikeDetector,
)
from lr_guard.detectors.base import check_choice, check_number
from lr_guard.diagnostics import Diagnostics, scalars
from lr_guard.events import Action, Decision
from lr_guard.policy import GuardPolicy, Intent, describe

__all__ = ["GuardCore"]

log = logging.getLogger("lr_guard")

STATE_VERSION = 1
_SHARDED = ("FSDP", "DeepSpeed", "ModelParallel")
_KINDS = ("spike", "oscillation", "plateau", "divergence")
_DEFAULTS: dict[str, type[Detector]] = {
    "spike": SpikeDetector,
    "oscillation": OscillationDetector,
    "plateau": PlateauDetector,
    "divergence": DivergenceDetector,
}


def _detector(name: str, value: Detector | bool) -> Detector:
    if isinstance(value, bool):
        return _DEFAULTS[name]() if value else NullDetector(name=f"{name} (off)")
    if isinstance(value, Detector):
        if not isinstance(value, (_DEFAULTS[name], NullDetector)):
            raise TypeError(f"{name} must be a {_DEFAULTS[name].__name__}, True or False; got a {type(value).__name__}")
        return value
    raise TypeError(f"{name} must be a {_DEFAULTS[name].__name__}, True or False; got {value!r}")


def _check_factor(name: str, value: float | None, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    check_number(name, value, low=0.0, high=1.0, low_open=True, high_open=True)


def _state_bytes(model: Any, optimizers: Sequence[Any]) -> int:
    return tree_nbytes(model.state_dict()) + sum(tree_nbytes(o.state_dict()) for o in optimizers)


class _PolicySetting:
    """A callback setting that is the policy's own attribute (one source of truth: changing it takes effect)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return self if obj is None else getattr(obj.policy, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj.policy, self.name, value)


class GuardCore:
    """Watches the training loss (or a logged metric) and keeps the run healthy.

    * **Divergence** (NaN/inf, blow-up, sustained rise): roll back in place to the last snapshot confirmed
      healthy -- weights and buffers, every optimizer's and scheduler's state, the precision plugin's state (AMP
      scaler) and the RNG states -- then cut the LR by ``rollback_factor`` (not on the first rollback for a bad
      batch: see ``keep_lr_on_bad_batch``) and skip the next ``skip_batches``
      updates (a skipped update changes neither weights, nor buffers such as BatchNorm statistics, nor the
      optimizer's state; the LR schedule still advances). After ``max_rollbacks`` rollbacks without a new
      healthy snapshot in between, restore the last good state, write it as a Lightning checkpoint and stop
      training cleanly.
    * **Plateau**: cut the LR by ``plateau_factor`` (held while the schedule's own LR is still rising). A plateau
      while the loss is less than 5% below its first value is a failed start (a model broken in its first steps):
      restart from the starting state with the LR times ``rollback_factor``, at most ``max_rollbacks`` times.
    * **Oscillation**: cut the LR by ``oscillation_factor``.
    * **Spike**: logged (a spike that lasts becomes a divergence). With ``skip_spikes=True`` the update of a step
      whose loss scores as a spike (or is non-finite) is not applied; this reads the loss before the optimizer
      step, one host synchronisation per step, so it is off by default.

    LR cuts compose with any LR scheduler: after a cut by ``f`` the LR is ``f`` times what the schedule alone gives,
    at every later step, and never below ``min_lr``. Lightning's ``global_step`` keeps counting through a rollback,
    so ``max_steps`` includes the discarded steps.

    Args:
        monitor: ``None`` watches the loss ``training_step`` returns (one value per optimizer step, the mean over
            accumulated micro-batches). A name watches a metric the user logs instead (needed for manual
            optimization). Read after every step, Lightning's ``callback_metrics`` converts each metric logged
            with ``prog_bar=True`` to a Python number, a host sync each on a GPU: log with ``prog_bar=False``
            there, or watch the loss.
        check_on: ``"train_step"`` (read after every optimizer step) or ``"validation"`` (after every validation
            run). Defaults to ``"train_step"`` without ``monitor`` and ``"validation"`` with it.
        spike, oscillation, plateau, divergence: ``True`` for the default detector, ``False`` to switch it off,
            or a configured detector. ``plateau=True`` with a Trainer ``max_steps`` sizes the plateau detector to
            the run: ``patience = max_steps // 10`` clamped to 100..1000 steps, ``window = patience // 10``.
        plateau_factor: LR factor on a plateau; ``None`` to only log plateaus.
        oscillation_factor: LR factor on oscillation; ``None`` to only log.
        rollback: Roll back on divergence (``False``: only log, and stop on exhaustion is never reached).
        rollback_factor: LR factor applied with each rollback.
        skip_batches: Updates skipped after a rollback, so the data that caused the blow-up is not learned from.
        max_rollbacks: Rollbacks allowed without a new healthy snapshot in between; one more stops training.
        keep_lr_on_bad_batch: Keep the LR on the first rollback of an incident when it was set off by one
            sudden value (NaN/inf, or a blow-up to ``instant_factor`` times the best) after at least
            ``confirm_steps`` values with no event, outside a warm-up: that is a bad batch, which the data stream
            has moved past, not a too-high LR. If the trouble comes back, the next rollback cuts the LR.
            ``False``: every rollback cuts the LR by ``rollback_factor``.
        skip_spikes: Skip the update of a spiking (or non-finite) step; costs one host sync per step.
        snapshot_every: Take a snapshot every this many optimizer steps.
        confirm_steps: Healthy values needed after a snapshot before it counts as good.
        check_every_n_steps: The watched values are gathered on the device and checked in batches, every this
            many optimizer steps, before each snapshot and at the end of each epoch: one transfer (and under DDP
            one collective) per batch, and the detectors run in one tight loop. Decisions therefore come up to
            this many steps late; a rollback returns to a snapshot confirmed healthy, so the late steps are
            discarded with the rest. ``1`` checks every step. With ``skip_spikes=True`` every step is checked.
        min_lr: Floor for the guard's cuts: one value or one per param group (of every optimizer).
        eps: A cut that changes a group's LR by ``eps`` or less is not made (as torch).
        checkpoint_dir: Where the last good state is written on stop; default
            ``<default_root_dir>/lr_guard_checkpoints``.
        snapshot_device: ``"cpu"`` (default, no accelerator memory), ``"same"`` (beside the weights) or
            ``"disk"`` (streamed to ``snapshot_dir`` by a background thread, for states larger than host memory).
        snapshot_memory_budget: Bytes of host memory the snapshots may take (two copies; three until the loss is
            5% below where it started), checked at every snapshot (an optimizer's state appears with its first
            step); over it, ``"cpu"`` snapshots go to disk from then on, with a warning. ``None``: no limit.
        snapshot_dir: Where disk snapshots go; default ``<default_root_dir>/lr_guard_snapshots``. Their files
            (up to three per rank) are scratch, removed when training ends.
        diagnostics: Send scalars, the decision log, the configuration and a dashboard layout to the Trainer's
            loggers (see :mod:`lr_guard.diagnostics` for the keys).
        log_every_n_steps: Cadence of the scalars; default: the Trainer's ``log_every_n_steps``.
        verbose: Log every decision through Python ``logging`` (logger ``"lr_guard"``) on rank zero.
    """

    plateau_factor = _PolicySetting()
    oscillation_factor = _PolicySetting()
    rollback = _PolicySetting()
    rollback_factor = _PolicySetting()
    skip_batches = _PolicySetting()
    max_rollbacks = _PolicySetting()
    keep_lr_on_bad_batch = _PolicySetting()
    snapshot_every = _PolicySetting()
    confirm_steps = _PolicySetting()

    def __init__(
        self,
        monitor: str | None = None,
        check_on: Literal["train_step", "validation"] | None = None,
        spike: SpikeDetector | bool = True,
        oscillation: OscillationDetector | bool = True,
        plateau: PlateauDetector | bool = True,
        divergence: DivergenceDetector | bool = True,
        plateau_factor: float | None = 0.5,
        oscillation_factor: float | None = 0.5,
        rollback: bool = True,
        rollback_factor: float = 0.5,
        skip_batches: int = 0,
        max_rollbacks: int = 3,
        keep_lr_on_bad_batch: bool = True,
        skip_spikes: bool = False,
        snapshot_every: int = 50,
        confirm_steps: int = 10,
        check_every_n_steps: int = 8,
        min_lr: float | Sequence[float] = 0.0,
        eps: float = 1e-8,
        checkpoint_dir: str | None = None,
        snapshot_device: Literal["cpu", "same", "disk"] = "cpu",
        snapshot_memory_budget: int | None = None,
        snapshot_dir: str | None = None,
        diagnostics: bool = True,
        log_every_n_steps: int | None = None,
        verbose: bool = True,
    ) -> None:
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"monitor must be None (the training loss) or a metric name, got {monitor!r}")
        if check_on is not None:
            check_choice("check_on", check_on, ("train_step", "validation"))
        _check_factor("plateau_factor", plateau_factor)
        _check_factor("oscillation_factor", oscillation_factor)
        _check_factor("rollback_factor", rollback_factor, allow_none=False)
        if not isinstance(rollback, bool):
            raise TypeError(f"rollback must be True or False, got {rollback!r}")
        if not isinstance(keep_lr_on_bad_batch, bool):
            raise TypeError(f"keep_lr_on_bad_batch must be True or False, got {keep_lr_on_bad_batch!r}")
        if not isinstance(skip_spikes, bool):
            raise TypeError(f"skip_spikes must be True or False, got {skip_spikes!r}")
        check_number("skip_batches", skip_batches, low=0, integer=True)
        check_number("max_rollbacks", max_rollbacks, low=0, integer=True)
        check_number("snapshot_every", snapshot_every, low=1, integer=True)
        check_number("confirm_steps", confirm_steps, low=1, integer=True)
        check_number("check_every_n_steps", check_every_n_steps, low=1, integer=True)
        if isinstance(min_lr, (list, tuple)):
            for i, m in enumerate(min_lr):
                check_number(f"min_lr[{i}]", m, low=0.0)
        else:
            check_number("min_lr", min_lr, low=0.0)
        check_number("eps", eps, low=0.0)
        if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
            raise TypeError(f"checkpoint_dir must be a path or None, got {checkpoint_dir!r}")
        check_choice("snapshot_device", snapshot_device, ("cpu", "same", "disk"))
        if snapshot_memory_budget is not None:
            check_number("snapshot_memory_budget", snapshot_memory_budget, low=0, integer=True)
        if snapshot_dir is not None and not isinstance(snapshot_dir, (str, os.PathLike)):
            raise TypeError(f"snapshot_dir must be a path or None, got {snapshot_dir!r}")
        if not isinstance(diagnostics, bool):
            raise TypeError(f"diagnostics must be True or False, got {diagnostics!r}")
        if log_every_n_steps is not None:
            check_number("log_every_n_steps", log_every_n_steps, low=1, integer=True)
        self.monitor = monitor
        self.check_on = check_on if check_on is not None else ("train_step" if monitor is None else "validation")
        self._auto_plateau = plateau is True
        self.detectors: dict[str, Detector] = {
            "spike": _detector("spike", spike),
            "oscillation": _detector("oscillation", oscillation),
            "plateau": _detector("plateau", plateau),
            "divergence": _detector("divergence", divergence),
        }
        self.policy = GuardPolicy(
            self.detectors,
            plateau_factor=plateau_factor,
            oscillation_factor=oscillation_factor,
            rollback=rollback,
            rollback_factor=rollback_factor,
            skip_batches=skip_batches,
            max_rollbacks=max_rollbacks,
            snapshot_every=snapshot_every,
            confirm_steps=confirm_steps,
            keep_lr_on_bad_batch=keep_lr_on_bad_batch,
        )
        self.skip_spikes = skip_spikes
        self.check_every_n_steps = check_every_n_steps
        if skip_spikes and not isinstance(self.detectors["spike"], SpikeDetector):
            raise ValueError("skip_spikes=True needs the spike detector: leave spike=True or pass a SpikeDetector")
        self.min_lr: float | list[float] = (
            [float(m) for m in min_lr] if isinstance(min_lr, (list, tuple)) else float(min_lr)  # type: ignore[arg-type]
        )
        self.eps = float(eps)
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.snapshot_device = snapshot_device
        self.snapshot_memory_budget = snapshot_memory_budget
        self.snapshot_dir = None if snapshot_dir is None else os.fspath(snapshot_dir)
        self._storage = snapshot_device  # may become "disk" when the host copies would exceed the budget
        self.diagnostics = diagnostics
        self.log_every_n_steps = log_every_n_steps
        self.verbose = verbose
        self._diagnostics = Diagnostics()
        self._log_every = 50
        self.decisions: list[Decision] = []
        self._skip_left = 0
        self._world_size = 1
        self._disk_files: set[str] = set()  # disk snapshots' files written since setup: removed at teardown
        self._reset_run_state()

    # ------------------------------------------------------------------ state
    def _reset_run_state(self) -> None:
        self.policy.reset_run()
        self._host = HostScalars()
        self._accumulated: torch.Tensor | None = None
        self._unread: list[tuple[int, torch.Tensor]] = []  # (step, loss) not yet sent to the host
        self._last_global_step = -1
        self._snapshots: dict[int, Any] = {}  # Snapshot or DiskSnapshot behind the policy's good/pending marks
        self._spare: Any = None
        self._unfenced: list[Snapshot] = []  # snapshots whose copies may still be running on a side stream
        self._skip_buffers: dict[str, torch.Tensor] | None = None
        self._step_loss: torch.Tensor | None = None
        self.checkpoint_path: str | None = None

    @property
    def counts(self) -> dict[str, int]:
        """Events seen and actions taken so far: spike, oscillation, plateau, divergence, lr_cuts, rollbacks,
        skipped_batches, snapshots."""
        return self.policy.counts

    def settings(self) -> dict[str, Any]:
        """The constructor's arguments (detectors as their repr), as recorded in the configuration entry."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        out = {}
        for name in names:
            value = self.detectors[name] if name in self.detectors else getattr(self, name, None)
            out[name] = repr(value) if isinstance(value, Detector) else value
        return out

    @property
    def state_key(self) -> str:
        # Lightning reads this on every hook call (for its profiler): build it once.
        key = self.__dict__.get("_state_key")
        if key is None:
            key = f"{type(self).__qualname__}{{'monitor': {self.monitor!r}, 'check_on': {self.check_on!r}}}"
            self.__dict__["_state_key"] = key
        return key

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **self.policy.state_dict(), "skip_left": self._skip_left}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.policy.load_state_dict(state_dict, warn=lambda text: log.warning("lr_guard: %s", text))
        self._skip_left = int(state_dict.get("skip_left", 0))

    # ------------------------------------------------------------------ trainer access
    @staticmethod
    def _schedulers(trainer: Any) -> list[Any]:
        return [config.scheduler for config in trainer.lr_scheduler_configs]

    def _lr(self, trainer: Any) -> float:
        optimizers = trainer.optimizers
        return float(optimizers[0].param_groups[0]["lr"]) if optimizers else math.nan

    def _all_groups(self, trainer: Any) -> list[dict[str, Any]]:
        return [g for opt in trainer.optimizers for g in opt.param_groups]

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        max_steps = int(getattr(trainer, "max_steps", -1) or -1)
        if stage == "fit" and self._auto_plateau and max_steps > 0:
            # plateau=True sizes the detector to the run (before Lightning restores a checkpoint's state into it)
            patience = min(1000, max(100, max_steps // 10))
            self.detectors["plateau"] = PlateauDetector(patience=patience, window=min(100, patience))
            self.policy.refresh()
        strategy = type(trainer.strategy).__name__
        if stage == "fit" and any(name in strategy for name in _SHARDED):
            raise ValueError(
                f"{type(self).__name__} does not support the {strategy} strategy yet: its snapshots "
                "would gather the full sharded model on every rank. Supported: single-device and "
                "DDP strategies (ddp, ddp_spawn, ddp_find_unused_parameters_true, ...)"
            )
        if (
            stage == "fit"
            and self.check_on == "train_step"
            and self.monitor is None
            and not pl_module.automatic_optimization
        ):
            raise ValueError(
                f"{type(self).__name__}: with manual optimization the guard cannot see the loss "
                "training_step returns; log it (self.log('train_loss', loss)) and pass "
                "monitor='train_loss'"
            )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._reset_run_state()
        self._world_size = int(getattr(trainer, "world_size", 1) or 1)
        if self._world_size > 1:
            self._host = HostScalars(fixed_lag=1)  # every rank acts on the same step
        groups_per_optimizer = [len(opt.param_groups) for opt in trainer.optimizers]
        if isinstance(self.min_lr, list):
            if len(self.min_lr) != sum(groups_per_optimizer):
                raise ValueError(
                    f"min_lr has {len(self.min_lr)} values but the optimizers have "
                    f"{sum(groups_per_optimizer)} param groups in all; give one value, or one per group"
                )
            floors = iter(self.min_lr)
            for opt, n in zip(trainer.optimizers, groups_per_optimizer, strict=True):
                set_min_lr(opt, [next(floors) for _ in range(n)])
        else:
            for opt in trainer.optimizers:
                set_min_lr(opt, self.min_lr)
        for scheduler in self._schedulers(trainer):
            compose_with_scheduler(scheduler)
        self._last_global_step = trainer.global_step
        self._storage = self.snapshot_device
        self.policy.start(trainer.global_step)
        if self.diagnostics:
            self._log_every = self.log_every_n_steps or int(getattr(trainer, "log_every_n_steps", 50) or 50)
            self._diagnostics.attach(trainer, self.settings())
        if self.rollback:
            self._snapshots[trainer.global_step] = self._snapshot(trainer, pl_module)

    def _next_disk_slot(self) -> int:
        in_use = {os.path.basename(s.path) for s in self._snapshots.values() if isinstance(s, DiskSnapshot)}
        for slot in range(3):
            if not any(name.endswith(f"_slot{slot}.bin") for name in in_use):
                return slot
        return 3  # pragma: no cover - at most two snapshots are held

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        for scheduler in self._schedulers(trainer):
            release_scheduler(scheduler)
        self._snapshots = {}
        self._spare = None
        self._unfenced = []
        for path in sorted(self._disk_files):  # scratch as large as the training state: not left behind
            remove_snapshot_files(path)
        self._disk_files = set()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # Lightning does not call callbacks' teardown when training raises: leave the schedulers as they were.
        self.teardown(trainer, pl_module, "fit")

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if (self._skip_left > 0 or self.skip_spikes) and self._skip_buffers is None:
            self._skip_buffers = save_buffers(pl_module)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        if self.skip_spikes:
            loss = loss.detach()
            self._step_loss = loss if self._step_loss is None else self._step_loss + loss

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self._unfenced:  # the step overwrites what a snapshot may still be copying (GPU only)
            for snapshot in self._unfenced:
                snapshot.fence()
            self._unfenced = []
        step_loss, self._step_loss = self._step_loss, None
        skip = False
        if self._skip_left > 0:
            self._skip_left -= 1
            self.counts["skipped_batches"] += 1
            # its loss is still watched, but a NaN or spike in a batch whose update is dropped needs no rollback
            self.policy.skipped_updates[trainer.global_step] = True  # counted just above
            skip = True
        elif self.skip_spikes and step_loss is not None:
            value = float(self._agreed(trainer, step_loss))  # the one host sync per step that skip_spikes costs
            spike = self.detectors["spike"]
            assert isinstance(spike, SpikeDetector)
            if not math.isfinite(value) or spike.peek(value) >= spike.threshold:
                self.policy.skipped_updates[trainer.global_step] = False  # counted when its event arrives
                skip = True
        if skip:
            drop_gradients(optimizer)
            if self._skip_buffers is not None:
                restore_buffers(pl_module, self._skip_buffers)
        self._skip_buffers = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.policy.stopped:
            return
        global_step = trainer.global_step  # a computed property in Lightning: read it once
        if self.check_on == "train_step" and self.monitor is None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if isinstance(loss, torch.Tensor):  # Lightning hands a detached copy: no graph is kept
                self._accumulated = loss if self._accumulated is None else self._accumulated + loss
        if global_step == self._last_global_step:
            return  # a micro-batch of gradient accumulation: no optimizer step yet
        step, self._last_global_step = self._last_global_step, global_step  # the step this batch trained
        if self.check_on == "train_step":
            value = self._accumulated if self.monitor is None else self._metric(trainer)
            self._accumulated = None
            if value is not None:
                self._unread.append((step, value))  # a tensor, possibly on the device: not read here
        snapshot_due = self.policy.rollback and global_step % self.policy.snapshot_every == 0
        if snapshot_due or global_step % (1 if self.skip_spikes else self.check_every_n_steps) == 0:
            self._check(trainer, pl_module)
        if snapshot_due and self.policy.wants_snapshot(global_step):
            self._snapshots[global_step] = self._snapshot(trainer, pl_module)
            self.policy.snapshot_taken(global_step)

    def _check(self, trainer: Any, pl_module: Any, wait: bool = False) -> None:
        """Send the values gathered since the last check on their way to the host (one batch: one copy, and
        under DDP one collective), and run the policy on every value that has arrived (all of them with
        ``wait``)."""
        self._note_schedule(trainer)
        if self._unread:
            unread, self._unread = self._unread, []
            steps = [s for s, _ in unread]
            if self._world_size > 1 or unread[0][1].is_cuda:
                values = [v.reshape(()) if v.numel() == 1 else v.sum() for _, v in unread]
                self._host.push(steps, self._agreed(trainer, torch.stack(values).float()))
            else:  # on the host already: reading a value costs no more than a Python float
                self._host.push(steps, [float(v) if v.numel() == 1 else float(v.sum()) for _, v in unread])
        ready = self._host.drain() if wait else self._host.ready()
        if ready:
            self._process(trainer, pl_module, ready)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.policy.stopped:
            self._check(trainer, pl_module, wait=True)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.check_on != "validation" or trainer.sanity_checking or self.policy.stopped:
            return
        self._host.push([trainer.global_step], self._agreed(trainer, self._metric(trainer)).reshape(1))
        self._process(trainer, pl_module, self._host.drain())

    def _agreed(self, trainer: Any, value: torch.Tensor) -> torch.Tensor:
        """The value every rank sees: the mean over ranks (one scalar all-reduce; a NaN anywhere is a NaN
        everywhere), so all ranks' detectors hold the same state and take the same decisions on the same step."""
        if self._world_size <= 1:
            return value
        return trainer.strategy.reduce(value.detach().float(), reduce_op="mean")

    def _metric(self, trainer: Any) -> torch.Tensor:
        assert self.monitor is not None
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            raise RuntimeError(
                f"{type(self).__name__} is watching monitor={self.monitor!r}, which is not among the "
                f"logged metrics. Log it with self.log({self.monitor!r}, ...) or pass one of: "
                f"{', '.join(sorted(metrics)) or '(no metric is logged yet)'}"
            )
        value = metrics[self.monitor]
        return value if isinstance(value, torch.Tensor) else torch.tensor(float(value))

    def _note_schedule(self, trainer: Any) -> None:
        """Is the user's schedule raising the LR (a warm-up)? Read on the first param group's unscaled LR."""
        optimizers = trainer.optimizers
        if not optimizers:
            return
        group = optimizers[0].param_groups[0]
        self.policy.note_lr(group.get(UNSCALED, group["lr"]), trainer.global_step)

    # ------------------------------------------------------------------ carrying out the policy
    def _process(self, trainer: Any, pl_module: Any, values: list[tuple[int, float]]) -> None:
        observe = self.policy.observe
        log_every = self._log_every if self.diagnostics and self._diagnostics.active else 0
        for step, value in values:
            intents = observe(step, value)
            rolled_back = False
            for intent in intents:
                self._execute(trainer, pl_module, intent)
                rolled_back = rolled_back or intent.action == Action.ROLLBACK
            if log_every and step % log_every == 0:
                groups = [
                    (f"opt{i}_group{j}", g)
                    for i, opt in enumerate(trainer.optimizers)
                    for j, g in enumerate(opt.param_groups)
                ]
                self._diagnostics.log_scalars(scalars(value, self.detectors, groups, self.counts), step)
            if rolled_back or self.policy.stopped:
                break  # the values after a rollback describe weights that are gone
        if len(self._snapshots) > 1:  # free what the rules can no longer restore; its buffers are reused
            keep = self.policy.kept_steps()
            for s in [s for s in self._snapshots if s not in keep]:
                self._spare = self._snapshots.pop(s)

    def _execute(self, trainer: Any, pl_module: Any, intent: Intent) -> None:
        lr = self._lr(trainer)
        checkpoint = None
        if intent.action == Action.ROLLBACK:
            factors = lr_factors(trainer.optimizers)
            self._restore(trainer, pl_module, intent)
            set_lr_factors(trainer.optimizers, [[f * intent.lr_factor for f in fs] for fs in factors])
            self._skip_left = intent.skip_batches
        elif intent.action == Action.STOP:
            self._restore(trainer, pl_module, intent)
            directory = self.checkpoint_dir or os.path.join(trainer.default_root_dir, "lr_guard_checkpoints")
            checkpoint = os.path.join(directory, f"last_good_step{intent.rollback_to}.ckpt")
            trainer.save_checkpoint(checkpoint)
            trainer.should_stop = True
            self.checkpoint_path = checkpoint
        elif intent.action == Action.LR_CUT:
            if cut_lr(trainer.optimizers, intent.lr_factor, eps=self.eps):
                self.counts["lr_cuts"] += 1
            else:
                intent = Intent(
                    intent.event, Action.HELD, reason="no LR cut: every group is at min_lr or the change is below eps"
                )
        message = describe(
            intent, lr, self._lr(trainer), self.max_rollbacks, self.policy.incident_rollbacks, checkpoint
        )
        decision = Decision(
            intent.event,
            intent.action,
            trainer.global_step,
            lr,
            self._lr(trainer),
            intent.rollback_to,
            intent.skip_batches,
            checkpoint,
            message,
        )
        self.decisions.append(decision)
        if self.diagnostics:
            self._diagnostics.log_decision(decision, self.counts)
        if self.verbose and trainer.is_global_zero:
            level = logging.WARNING if intent.action in (Action.ROLLBACK, Action.STOP) else logging.INFO
            log.log(level, "lr_guard: %s", message)

    def _restore(self, trainer: Any, pl_module: Any, intent: Intent) -> None:
        assert intent.rollback_to is not None
        snapshot = self._snapshots[intent.rollback_to]
        snapshot.restore(pl_module, trainer.optimizers, self._schedulers(trainer), precision=trainer.precision_plugin)
        self._snapshots = {intent.rollback_to: snapshot}
        self._host.clear()
        self._unread = []
        self._accumulated = None

    def _snapshot_dir(self, trainer: Any) -> str:
        return self.snapshot_dir or os.path.join(trainer.default_root_dir, "lr_guard_snapshots")

    def _check_budget(self, trainer: Any, pl_module: Any) -> None:
        """Send snapshots to disk once the host copies the rules keep would exceed ``snapshot_memory_budget``.
        Checked at every snapshot, not once at the start: an optimizer's state (Adam's moments) only appears with
        its first step."""
        if self._storage != "cpu" or self.snapshot_memory_budget is None:
            return
        copies = 3 if self.policy.origin is not None else 2  # the starting state is kept until progress
        needed = copies * _state_bytes(pl_module, trainer.optimizers)
        if needed > self.snapshot_memory_budget:
            self._storage = "disk"
            warnings.warn(
                f"{type(self).__name__}: {copies} snapshots of this training state need {needed / 1e9:.2f} GB of "
                f"host memory, over snapshot_memory_budget={self.snapshot_memory_budget / 1e9:.2f} GB; writing "
                f"them to disk instead ({self._snapshot_dir(trainer)})",
                UserWarning,
                stacklevel=2,
            )

    def _snapshot(self, trainer: Any, pl_module: Any) -> Any:
        self._check_budget(trainer, pl_module)
        spare, self._spare = self._spare, None  # a snapshot no longer needed: its buffers (or file) are reused
        if self._storage == "disk":
            if isinstance(spare, DiskSnapshot):
                slot = os.path.basename(spare.path)[: -len(".bin")]
            else:
                slot = f"rank{trainer.global_rank}_slot{self._next_disk_slot()}"
            written = take_disk_snapshot(
                trainer.global_step,
                pl_module,
                trainer.optimizers,
                self._schedulers(trainer),
                self._snapshot_dir(trainer),
                slot,
                precision=trainer.precision_plugin,
            )
            self._disk_files.add(written.path)
            return written
        snapshot = take_snapshot(
            trainer.global_step,
            pl_module,
            trainer.optimizers,
            self._schedulers(trainer),
            precision=trainer.precision_plugin,
            device=self._storage,
            reuse=spare if isinstance(spare, Snapshot) else None,
        )
        if snapshot.ready is not None:
            self._unfenced.append(snapshot)
        return snapshot
