"""The guard's logic, written once for both Lightning namespaces.

``pytorch_lightning`` and ``lightning.pytorch`` publish the same ``Trainer``, but each Trainer rejects callbacks
that subclass the other's ``Callback``. The hooks here only use the Trainer's public API, so the public classes
(``lr_guard.LRGuard`` for ``pytorch_lightning``, ``lr_guard.lightning.LRGuard`` for ``lightning.pytorch``) are
this class plus the namespace's ``Callback`` base, and nothing else.
"""

from __future__ import annotations

import logging
import math
import os
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
from lr_guard.actions.lr import UNSCALED
from lr_guard.detectors import (
    Detector,
    DivergenceDetector,
    NullDetector,
    OscillationDetector,
    PlateauDetector,
    SpikeDetector,
)
from lr_guard.detectors.base import check_choice, check_number
from lr_guard.events import Action, Decision, Event, EventKind

__all__ = ["GuardCore"]

log = logging.getLogger("lr_guard")

STATE_VERSION = 1
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


class GuardCore:
    """Watches the training loss (or a logged metric) and keeps the run healthy.

    * **Divergence** (NaN/inf, blow-up, sustained rise): roll back in place to the last snapshot confirmed
      healthy -- weights and buffers, every optimizer's and scheduler's state, the precision plugin's state (AMP
      scaler) and the RNG states -- then cut the LR by ``rollback_factor`` and skip the next ``skip_batches``
      updates (a skipped update changes neither weights, nor buffers such as BatchNorm statistics, nor the
      optimizer's state; the LR schedule still advances). After ``max_rollbacks`` rollbacks without a new
      healthy snapshot in between, restore the last good state, write it as a Lightning checkpoint and stop
      training cleanly.
    * **Plateau**: cut the LR by ``plateau_factor`` (held while the schedule's own LR is still rising).
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
            optimization).
        check_on: ``"train_step"`` (read after every optimizer step) or ``"validation"`` (after every validation
            run). Defaults to ``"train_step"`` without ``monitor`` and ``"validation"`` with it.
        spike, oscillation, plateau, divergence: ``True`` for the default detector, ``False`` to switch it off,
            or a configured detector.
        plateau_factor: LR factor on a plateau; ``None`` to only log plateaus.
        oscillation_factor: LR factor on oscillation; ``None`` to only log.
        rollback: Roll back on divergence (``False``: only log, and stop on exhaustion is never reached).
        rollback_factor: LR factor applied with each rollback.
        skip_batches: Updates skipped after a rollback, so the data that caused the blow-up is not learned from.
        max_rollbacks: Rollbacks allowed without a new healthy snapshot in between; one more stops training.
        skip_spikes: Skip the update of a spiking (or non-finite) step; costs one host sync per step.
        snapshot_every: Take a snapshot every this many optimizer steps.
        confirm_steps: Healthy values needed after a snapshot before it counts as good.
        min_lr: Floor for the guard's cuts: one value or one per param group (of every optimizer).
        eps: A cut that changes a group's LR by ``eps`` or less is not made (as torch).
        checkpoint_dir: Where the last good state is written on stop; default
            ``<default_root_dir>/lr_guard_checkpoints``.
        snapshot_device: ``"cpu"`` (default, no accelerator memory) or ``"same"`` (beside the weights).
        verbose: Log every decision through Python ``logging`` (logger ``"lr_guard"``) on rank zero.
    """

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
        skip_spikes: bool = False,
        snapshot_every: int = 50,
        confirm_steps: int = 10,
        min_lr: float | Sequence[float] = 0.0,
        eps: float = 1e-8,
        checkpoint_dir: str | None = None,
        snapshot_device: Literal["cpu", "same"] = "cpu",
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
        if not isinstance(skip_spikes, bool):
            raise TypeError(f"skip_spikes must be True or False, got {skip_spikes!r}")
        check_number("skip_batches", skip_batches, low=0, integer=True)
        check_number("max_rollbacks", max_rollbacks, low=0, integer=True)
        check_number("snapshot_every", snapshot_every, low=1, integer=True)
        check_number("confirm_steps", confirm_steps, low=1, integer=True)
        if isinstance(min_lr, (list, tuple)):
            for i, m in enumerate(min_lr):
                check_number(f"min_lr[{i}]", m, low=0.0)
        else:
            check_number("min_lr", min_lr, low=0.0)
        check_number("eps", eps, low=0.0)
        if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
            raise TypeError(f"checkpoint_dir must be a path or None, got {checkpoint_dir!r}")
        check_choice("snapshot_device", snapshot_device, ("cpu", "same"))
        self.monitor = monitor
        self.check_on = check_on if check_on is not None else ("train_step" if monitor is None else "validation")
        self.detectors: dict[str, Detector] = {
            "spike": _detector("spike", spike),
            "oscillation": _detector("oscillation", oscillation),
            "plateau": _detector("plateau", plateau),
            "divergence": _detector("divergence", divergence),
        }
        self.plateau_factor = plateau_factor
        self.oscillation_factor = oscillation_factor
        self.rollback = rollback
        self.rollback_factor = rollback_factor
        self.skip_batches = skip_batches
        self.max_rollbacks = max_rollbacks
        self.skip_spikes = skip_spikes
        if skip_spikes and not isinstance(self.detectors["spike"], SpikeDetector):
            raise ValueError("skip_spikes=True needs the spike detector: leave spike=True or pass a SpikeDetector")
        self.snapshot_every = snapshot_every
        self.confirm_steps = confirm_steps
        self.min_lr: float | list[float] = (
            [float(m) for m in min_lr] if isinstance(min_lr, (list, tuple)) else float(min_lr)  # type: ignore[arg-type]
        )
        self.eps = float(eps)
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.snapshot_device = snapshot_device
        self.verbose = verbose
        self.decisions: list[Decision] = []
        self._reset_run_state()

    # ------------------------------------------------------------------ state
    def _reset_run_state(self) -> None:
        self._host = HostScalars()
        self._accumulated: torch.Tensor | float | None = None
        self._last_global_step = -1
        self._good: Snapshot | None = None
        self._pending: Snapshot | None = None
        self._healthy_after_pending = 0
        self._incident_rollbacks = 0
        self._skip_left = 0
        self._skip_buffers: dict[str, torch.Tensor] | None = None
        self._step_loss: torch.Tensor | None = None
        self._spike_skipped: set[int] = set()
        self._last_unscaled: list[float] | None = None
        self._lr_rising = False
        self._stopped = False
        self.checkpoint_path: str | None = None
        self.counts = {
            "spike": 0,
            "oscillation": 0,
            "plateau": 0,
            "divergence": 0,
            "lr_cuts": 0,
            "rollbacks": 0,
            "skipped_batches": 0,
            "snapshots": 0,
        }

    @property
    def state_key(self) -> str:
        return f"{type(self).__qualname__}{{'monitor': {self.monitor!r}, 'check_on': {self.check_on!r}}}"

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "detectors": {name: d.state_dict() for name, d in self.detectors.items()},
            "counts": dict(self.counts),
            "incident_rollbacks": self._incident_rollbacks,
            "skip_left": self._skip_left,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, state in state_dict.get("detectors", {}).items():
            detector = self.detectors.get(name)
            if detector is None or isinstance(detector, NullDetector):
                continue
            if state.get("detector") != type(detector).__name__:
                log.warning(
                    "lr_guard: checkpoint holds %s state for %r; keeping a fresh %s",
                    state.get("detector"),
                    name,
                    type(detector).__name__,
                )
                continue
            detector.load_state_dict(state)
        self.counts.update({k: int(v) for k, v in state_dict.get("counts", {}).items() if k in self.counts})
        self._incident_rollbacks = int(state_dict.get("incident_rollbacks", 0))
        self._skip_left = int(state_dict.get("skip_left", 0))

    def _detector_state(self) -> dict[str, Any]:
        return {name: d.state_dict() for name, d in self.detectors.items()}

    def _restore_detectors(self, state: dict[str, Any]) -> None:
        for name, d in self.detectors.items():
            if name in state:
                d.load_state_dict(state[name])

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
        self._reset_run_state_keep_counts()
        groups_per_optimizer = [len(opt.param_groups) for opt in trainer.optimizers]
        if isinstance(self.min_lr, list):
            if len(self.min_lr) != sum(groups_per_optimizer):
                raise ValueError(
                    f"min_lr has {len(self.min_lr)} values but the optimizers have "
                    f"{sum(groups_per_optimizer)} param groups in all; give one value, or one per group"
                )
            it = iter(self.min_lr)
            for opt, n in zip(trainer.optimizers, groups_per_optimizer, strict=True):
                set_min_lr(opt, [next(it) for _ in range(n)])
        else:
            for opt in trainer.optimizers:
                set_min_lr(opt, self.min_lr)
        for scheduler in self._schedulers(trainer):
            compose_with_scheduler(scheduler)
        self._good = self._snapshot(trainer, pl_module) if self.rollback else None
        self._last_global_step = trainer.global_step

    def _reset_run_state_keep_counts(self) -> None:
        counts, incident, skip = dict(self.counts), self._incident_rollbacks, self._skip_left
        self._reset_run_state()
        self.counts, self._incident_rollbacks, self._skip_left = counts, incident, skip

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        for scheduler in self._schedulers(trainer):
            release_scheduler(scheduler)
        self._good = self._pending = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if (self._skip_left > 0 or self.skip_spikes) and self._skip_buffers is None:
            self._skip_buffers = save_buffers(pl_module)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        if self.skip_spikes:
            loss = loss.detach()
            self._step_loss = loss if self._step_loss is None else self._step_loss + loss

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        step_loss, self._step_loss = self._step_loss, None
        skip = False
        if self._skip_left > 0:
            self._skip_left -= 1
            self.counts["skipped_batches"] += 1
            skip = True
        elif self.skip_spikes and step_loss is not None:
            value = float(step_loss)  # the one host sync per step that skip_spikes costs
            spike = self.detectors["spike"]
            assert isinstance(spike, SpikeDetector)
            if not math.isfinite(value) or spike.peek(value) >= spike.threshold:
                self._spike_skipped.add(trainer.global_step)
                skip = True
        if skip:
            drop_gradients(optimizer)
            if self._skip_buffers is not None:
                restore_buffers(pl_module, self._skip_buffers)
        self._skip_buffers = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._stopped:
            return
        stepped = trainer.global_step != self._last_global_step
        step = self._last_global_step  # the step this batch trained (global_step before its update)
        if self.check_on == "train_step":
            if self.monitor is None:
                loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
                if isinstance(loss, torch.Tensor):
                    loss = loss.detach()
                    self._accumulated = loss if self._accumulated is None else self._accumulated + loss
            if stepped:
                value = self._accumulated if self.monitor is None else self._metric(trainer)
                self._accumulated = None
                if value is not None:
                    self._host.push(step, value)
        if stepped:
            self._last_global_step = trainer.global_step
            self._note_schedule(trainer)
        self._process(trainer, pl_module, self._host.ready())
        if (
            stepped
            and self.rollback
            and not self._stopped
            and self._pending is None
            and trainer.global_step % self.snapshot_every == 0
            and self._quiet()
        ):
            self._pending = self._snapshot(trainer, pl_module)
            self._healthy_after_pending = 0

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._stopped:
            self._process(trainer, pl_module, self._host.drain())

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.check_on != "validation" or trainer.sanity_checking or self._stopped:
            return
        value = self._metric(trainer)
        if value is not None:
            self._host.push(trainer.global_step, value)
            self._process(trainer, pl_module, self._host.drain())

    def _metric(self, trainer: Any) -> torch.Tensor | None:
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
        unscaled = [float(g.get(UNSCALED, g["lr"])) for g in self._all_groups(trainer)]
        if self._last_unscaled is not None and len(unscaled) == len(self._last_unscaled):
            self._lr_rising = any(u > p * (1 + 1e-9) for u, p in zip(unscaled, self._last_unscaled, strict=True))
        self._last_unscaled = unscaled

    # ------------------------------------------------------------------ decisions
    def _process(self, trainer: Any, pl_module: Any, values: list[tuple[int, float]]) -> None:
        for step, value in values:
            if self._stopped:
                return
            events = [e for d in self.detectors.values() if (e := d.update(value, step)) is not None]
            healthy = (
                math.isfinite(value)
                and not any(e.kind in (EventKind.SPIKE, EventKind.DIVERGENCE) for e in events)
                and self._quiet()
            )
            self._confirm_snapshot(step, healthy)
            for event in sorted(events, key=lambda e: e.kind != EventKind.DIVERGENCE):
                self.counts[event.kind.value] += 1
                if self._act(trainer, pl_module, event):
                    break  # a rollback or stop supersedes the other events of this step
            if self._spike_skipped:
                self._spike_skipped = {s for s in self._spike_skipped if s > step}

    def _quiet(self) -> bool:
        """Nothing is building up: the moment to take, or confirm, a snapshot of a good state."""
        return all(self.detectors[k].quiet for k in ("spike", "divergence", "oscillation"))

    def _confirm_snapshot(self, step: int, healthy: bool) -> None:
        if self._pending is None or step < self._pending.step:
            return
        if not healthy:
            self._pending = None
            return
        self._healthy_after_pending += 1
        if self._healthy_after_pending >= self.confirm_steps:
            self._good, self._pending = self._pending, None
            self._incident_rollbacks = 0

    def _act(self, trainer: Any, pl_module: Any, event: Event) -> bool:
        if event.step in self._spike_skipped and (
            event.kind == EventKind.SPIKE or (event.kind == EventKind.DIVERGENCE and not math.isfinite(event.value))
        ):
            self._spike_skipped.discard(event.step)  # the update was never applied: nothing to roll back
            self.counts["skipped_batches"] += 1
            lr = self._lr(trainer)
            self._record(event, Action.SKIP, trainer, lr, lr, f"{event.message} -- its update was not applied")
            return event.kind == EventKind.DIVERGENCE
        if event.kind == EventKind.DIVERGENCE and self.rollback:
            if self._incident_rollbacks >= self.max_rollbacks:
                self._stop(trainer, pl_module, event)
            else:
                self._rollback(trainer, pl_module, event)
            return True
        factor = {EventKind.PLATEAU: self.plateau_factor, EventKind.OSCILLATION: self.oscillation_factor}.get(
            event.kind
        )
        lr = self._lr(trainer)
        if factor is None:
            self._record(event, Action.NONE, trainer, lr, lr, f"{event.message} -- logged")
            return False
        if event.kind == EventKind.PLATEAU and self._lr_rising:
            self._record(
                event,
                Action.HELD,
                trainer,
                lr,
                lr,
                f"{event.message} -- no LR cut while the schedule's LR is still rising (warm-up)",
            )
            return False
        changes = cut_lr(trainer.optimizers, factor, eps=self.eps)
        if not changes:
            self._record(
                event,
                Action.HELD,
                trainer,
                lr,
                lr,
                f"{event.message} -- no LR cut: every group is at min_lr or the change is below eps",
            )
            return False
        self.counts["lr_cuts"] += 1
        new_lr = self._lr(trainer)
        self._record(
            event, Action.LR_CUT, trainer, lr, new_lr, f"{event.message} -- lr {lr:.3g} -> {new_lr:.3g} (x{factor:g})"
        )
        return False

    def _snapshot(self, trainer: Any, pl_module: Any) -> Snapshot:
        self.counts["snapshots"] += 1
        return take_snapshot(
            trainer.global_step,
            pl_module,
            trainer.optimizers,
            self._schedulers(trainer),
            precision=trainer.precision_plugin,
            extra={"detectors": self._detector_state()},
            device=self.snapshot_device,
        )

    def _restore_good(self, trainer: Any, pl_module: Any) -> Snapshot:
        good = self._good
        assert good is not None, "the guard takes a snapshot when training starts"
        good.restore(pl_module, trainer.optimizers, self._schedulers(trainer), precision=trainer.precision_plugin)
        self._restore_detectors(good.extra["detectors"])
        self._pending = None
        self._host.clear()
        self._accumulated = None
        return good

    def _rollback(self, trainer: Any, pl_module: Any, event: Event) -> None:
        lr = self._lr(trainer)
        factors = lr_factors(trainer.optimizers)
        good = self._restore_good(trainer, pl_module)
        set_lr_factors(trainer.optimizers, [[f * self.rollback_factor for f in fs] for fs in factors])
        self._skip_left = self.skip_batches
        self._incident_rollbacks += 1
        self.counts["rollbacks"] += 1
        new_lr = self._lr(trainer)
        skip = f", skipping the next {self.skip_batches} batches" if self.skip_batches else ""
        self._record(
            event,
            Action.ROLLBACK,
            trainer,
            lr,
            new_lr,
            f"{event.message} -- rolled back to step {good.step}, lr {lr:.3g} -> {new_lr:.3g}{skip} "
            f"(rollback {self._incident_rollbacks} of {self.max_rollbacks})",
            rollback_to=good.step,
            skip_batches=self.skip_batches,
        )

    def _stop(self, trainer: Any, pl_module: Any, event: Event) -> None:
        lr = self._lr(trainer)
        good = self._restore_good(trainer, pl_module)
        directory = self.checkpoint_dir or os.path.join(trainer.default_root_dir, "lr_guard_checkpoints")
        path = os.path.join(directory, f"last_good_step{good.step}.ckpt")
        self._stopped = True
        trainer.save_checkpoint(path)
        trainer.should_stop = True
        self.checkpoint_path = path
        self._record(
            event,
            Action.STOP,
            trainer,
            lr,
            self._lr(trainer),
            f"{event.message} -- still diverging after {self._incident_rollbacks} rollback(s); training "
            f"stopped. The last good state (step {good.step}) is saved at {path}; resume with "
            f"Trainer.fit(model, ckpt_path={path!r}) after changing what made it diverge",
            rollback_to=good.step,
            checkpoint=path,
        )

    def _record(
        self,
        event: Event,
        action: Action,
        trainer: Any,
        lr_before: float,
        lr_after: float,
        message: str,
        rollback_to: int | None = None,
        skip_batches: int = 0,
        checkpoint: str | None = None,
    ) -> None:
        decision = Decision(
            event, action, trainer.global_step, lr_before, lr_after, rollback_to, skip_batches, checkpoint, message
        )
        self.decisions.append(decision)
        if self.verbose and trainer.is_global_zero:
            level = logging.WARNING if action in (Action.ROLLBACK, Action.STOP) else logging.INFO
            log.log(level, "lr_guard: %s", message)
