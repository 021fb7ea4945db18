"""The guard's Lightning adapter, written once for both Lightning namespaces.

``pytorch_lightning`` and ``lightning.pytorch`` publish the same ``Trainer``, but each Trainer rejects callbacks
that subclass the other's ``Callback``. The hooks here only use the Trainer's public API, so the public classes
(``lr_guard.LRGuard`` for ``pytorch_lightning``, ``lr_guard.lightning.LRGuard`` for ``lightning.pytorch``) are
this class plus the namespace's ``Callback`` base, and nothing else.

The hooks are thin: they hand the Trainer's values to the parts that do the work, each with one job --
:class:`~lr_guard.config.GuardConfig` (the validated settings), :class:`~lr_guard.callbacks.feed.ValueFeed` (the
watched values, from the device to the host in batches), :class:`~lr_guard.policy.GuardPolicy` (the rules),
:class:`~lr_guard.executor.IntentExecutor` (carrying out the rules' intents on a
:class:`~lr_guard.callbacks.live_run.LiveRun`), :class:`~lr_guard.actions.snapshot_store.SnapshotStore` (the
snapshots) and :class:`~lr_guard.diagnostics.Diagnostics` (what a person sees).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from lr_guard.actions import compose_with_scheduler, release_scheduler
from lr_guard.actions.gate import UpdateGate
from lr_guard.actions.lr import UNSCALED, set_lr_factors, take_up_written_lrs
from lr_guard.actions.snapshot_store import SnapshotStore
from lr_guard.callbacks.feed import ValueFeed
from lr_guard.callbacks.live_run import LiveRun, schedulers, targets
from lr_guard.callbacks.range_sweep import sweep_divergence_detector
from lr_guard.callbacks.reporter import Reporter
from lr_guard.callbacks.schedule_peak import schedule_peak
from lr_guard.callbacks.settings import GuardSettings
from lr_guard.callbacks.skipper import UpdateSkipper
from lr_guard.callbacks.strategies import check_strategy, state_io_for
from lr_guard.config import GuardConfig, build_detectors, sized_detector
from lr_guard.detectors import (
    Detector,
    DivergenceDetector,
    OscillationDetector,
    PlateauDetector,
    SpikeDetector,
)
from lr_guard.events import Decision
from lr_guard.executor import IntentExecutor
from lr_guard.lr_search import sweep_lrs
from lr_guard.policy import GATE, GRAD_NORM, GuardPolicy

__all__ = ["GuardCore"]

log = logging.getLogger("lr_guard")

STATE_VERSION = 1


class GuardCore(GuardSettings):
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
            run). Defaults to ``"train_step"`` without ``monitor``; with it, to where the metric is logged, as the
            first optimizer step shows: ``"train_step"`` if the training step logs it, else ``"validation"``. A run
            that would watch nothing (``"validation"`` without a validation loop, or a metric logged nowhere)
            raises a ``ValueError``.
        spike, oscillation, plateau, divergence: ``True`` for the default detector, ``False`` to switch it off,
            or a configured detector. Left at ``True``, they fit the cadence the guard is fed at: per step, the
            plateau detector is sized to the run (``patience`` a tenth of its steps -- ``max_steps``, or what
            ``max_epochs`` makes -- clamped to 100..1000, ``window = min(100, patience)``); per validation, the
            plateau rule is torch's ``ReduceLROnPlateau`` with patience 5 values and threshold 1e-2 (window 1), and
            the divergence rule counts validations (:func:`~lr_guard.config.sized_detector`).
        detectors: More detectors, each any :class:`~lr_guard.Detector` (a user's own included), fed beside the
            built-in ones and shown under its ``name`` in the counts, TensorBoard, the decision log and replay.
            Its ``kind`` chooses the response: ``"divergence"`` rolls back, ``"plateau"`` / ``"oscillation"`` cut
            the LR by ``plateau_factor`` / ``oscillation_factor``, any other kind is logged. Its ``signal``: the
            ``"loss"`` (the watched value), or the name of a metric the module logs (read after every step).
        gate: The update gate (:class:`~lr_guard.UpdateGate`), which scores every optimizer step's loss and
            gradient norm before its update and skips a non-finite or outlier one exactly. ``None`` (the default):
            on, except with ``dry_run=True``, as ``UpdateGate(sync_fallback=False)``: on a GPU it gates only the
            optimizers that can skip on the device (torch's Adam, AdamW, SGD), so it adds no host sync per step;
            ``True``: ``UpdateGate()``, which reads the verdict on the host for the others; ``False``: off; or an
            ``UpdateGate`` with your settings.
        plateau_factor: LR factor on a plateau; ``None`` to only log plateaus.
        oscillation_factor: LR factor on oscillation; ``None`` to only log.
        rollback: Roll back on divergence (``False``: only log, and stop on exhaustion is never reached).
        rollback_factor: LR factor applied with each rollback.
        skip_batches: Updates skipped after a rollback, so the data that caused the blow-up is not learned from.
        max_rollbacks: Rollbacks allowed without a new healthy snapshot in between; one more stops training.
        keep_lr_on_bad_batch: Keep the LR on the first rollback of an incident when it was set off by one
            sudden value (NaN/inf, or a blow-up to ``instant_factor`` times the best) after at least
            ``confirm_steps`` optimizer steps with no event, outside a warm-up: that is a bad batch, which the
            data stream has moved past, not a too-high LR. If the trouble comes back, the next rollback cuts the LR.
            ``False``: every rollback cuts the LR by ``rollback_factor``.
        warmup_cap_factor: The warm-up as a range test. When the trouble a rollback answers began while the
            schedule's LR was rising (a warm-up carried it past where training stays stable), the first such
            rollback keeps the LR factor and caps the LR instead: at this fraction of the LR the optimizer stepped
            with at the incident's first event (a spike, oscillation or divergence after the last good snapshot,
            not the event that confirmed it). From then on each group's LR is ``min(schedule x factor, cap)``: the
            replayed warm-up rises to the cap and stays there until the schedule's decay passes under it. A later
            rollback (or cut) lowers factor and cap alike by its factor. A plateau whose loss lost ground since
            its best level while a warm-up raised the LR rolls back to a snapshot no later than that best and caps
            the LR at this fraction of the LR there (one more snapshot is held during a warm-up for it).
            ``None``: every such rollback cuts by ``rollback_factor``, as at a constant LR, and plateaus cut as
            usual.
        skip_spikes: Skip the update of a spiking (or non-finite) step; costs one host sync per step.
        snapshot_every: Take a snapshot every this many optimizer steps.
        confirm_steps: Optimizer steps of healthy values after a snapshot before it counts as good (with
            ``check_on="validation"``: the first healthy validation that many steps after it).
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
        snapshot_memory_budget: Bytes of host memory the snapshots may take (two copies; three while the starting
            state is kept, until the loss is 5% below where it started), checked at every snapshot (an optimizer's
            state appears with its first step); over it, ``"cpu"`` snapshots go to disk from then on, with a
            warning. ``None``: no limit.
        snapshot_dir: Where disk snapshots go; default ``<default_root_dir>/lr_guard_snapshots``. Their files
            (up to three per rank) are scratch, removed when training ends.
        diagnostics: Send scalars, the decision log, the configuration and a dashboard layout to the Trainer's
            loggers (see :mod:`lr_guard.diagnostics` for the keys).
        log_every_n_steps: Cadence of the scalars; default: the Trainer's ``log_every_n_steps``.
        verbose: Log every decision through Python ``logging`` (logger ``"lr_guard"``) on rank zero; with no
            logging set up, the lines reach the console, each on its own line beside a progress bar.
        dry_run: Log every decision as it would be taken ("would roll back to step 350, lr 0.01 -> 0.005") and
            change nothing: no rollback, LR cut, skipped update or stop, and no snapshot is taken. The detectors
            and the rules run as in a live run, counters included (``counts`` are what the live guard would have
            counted); after a rollback that was not made they go on watching the values that follow.
        lr_search: Search for a better LR both ways, with rollback as the net (:mod:`lr_guard.lr_search`): first
            an LR range test inside the run (``lr_search_sweep_steps``); where it finds no threshold, trials: while
            the loss falls steadily and quietly (no event and no LR change over ``lr_search_window`` values, every
            detector quiet, no warm-up under way, the schedule's own LR at least half its peak, and the loss's
            slope against log-step below zero by 2 standard errors), snapshot the state and raise the LR factor by
            ``lr_search_factor`` for ``lr_search_window`` steps. Keep the raise when the loss over the trial's
            second half lies below the trend before it by 2 standard errors; else (or on any event of a trial
            step) roll back to the snapshot, and never try that LR or above again -- nor the LR at which a
            divergence was rolled back or an LR cut made. The LR may then exceed what the schedule alone gives.
            A checkpoint written during a trial judges it first (rolls back when too few values are in), so it
            never holds a trial's state. Counted in ``counts``: ``lr_trials``, ``lr_raises_kept``,
            ``lr_trials_rolled_back``, ``discarded_trial_steps``. Needs ``rollback=True``; not with ``dry_run``.
        lr_search_factor: The raise of one trial (> 1); less where that would reach 0.9 of the ceiling.
        lr_search_window: Optimizer steps of a trial, and of the steady stretch before it (>= 6).
        lr_search_sweep_steps: With ``lr_search``, first an LR range test inside the run, once per fit, from the
            state training starts from: this many optimizer steps with the LR growing exponentially from 1/100 to
            1000 times the peak the schedule will reach (the schedulers stepped on paper to the end of the run),
            stopped early once the loss diverges, and read by :func:`~lr_guard.range_test.read_sweep`; then back
            to the starting state, with the schedule's peak lowered to the suggestion when above it, or raised to
            half the steepest descent when below that (:func:`~lr_guard.lr_search.placed_peak`). Its threshold is
            the ceiling from then on, and no trials follow a sweep that found one. Its steps are discarded and
            counted in ``discarded_trial_steps``. Needs the loss watched per step from the first step (``monitor=
            None`` or ``check_on="train_step"``). ``0``: no sweep, the trials alone (>= 10 otherwise).
    """

    def __init__(
        self,
        monitor: str | None = None,
        check_on: Literal["train_step", "validation"] | None = None,
        spike: SpikeDetector | bool = True,
        oscillation: OscillationDetector | bool = True,
        plateau: PlateauDetector | bool = True,
        divergence: DivergenceDetector | bool = True,
        detectors: Sequence[Detector] = (),
        gate: UpdateGate | bool | None = None,
        plateau_factor: float | None = 0.5,
        oscillation_factor: float | None = 0.5,
        rollback: bool = True,
        rollback_factor: float = 0.5,
        skip_batches: int = 0,
        max_rollbacks: int = 3,
        keep_lr_on_bad_batch: bool = True,
        warmup_cap_factor: float | None = 0.1,
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
        dry_run: bool = False,
        lr_search: bool = False,
        lr_search_factor: float = 2.0,
        lr_search_window: int = 20,
        lr_search_sweep_steps: int = 30,
    ) -> None:
        arguments = {k: v for k, v in locals().items() if k in GuardConfig.names()}
        self.config = GuardConfig(**arguments)
        switches = {"spike": spike, "oscillation": oscillation, "plateau": plateau, "divergence": divergence}
        self.extra_detectors = list(_as_list(detectors))
        self.gate = _gate(gate, dry_run)
        self.policy = GuardPolicy(_assemble(switches, self.extra_detectors, self.gate), self.config)
        _check_combinations(self.config, self.detectors, self.gate)
        # the built-in detectors left at their default (True): sized to the run's cadence and length when it starts
        self._sized_slots = {slot for slot in ("plateau", "divergence") if switches[slot] is True}
        self._saved_states: dict[str, Any] = {}  # a checkpoint's state of those, loaded once they are sized
        self.executor = IntentExecutor(self.policy, self.config)
        pushed = frozenset({GATE, GRAD_NORM}) if self.gate is not None else frozenset()
        self.feed = ValueFeed(self.config, self.policy.signals, type(self).__name__, pushed)
        self._reporter = Reporter(self.config)
        self._skipper = UpdateSkipper(self.policy, self.feed, self.gate)
        self._skips = self.policy.skips
        self._store = SnapshotStore()
        self._lr_hooks: list[Any] = []
        self._composed: list[Any] = []  # the schedulers composed with the guard's cuts in this fit
        self._fitting = False  # between on_train_start and teardown: a checkpoint's state checks the values first
        self._checking = False  # a check is running (its stop writes a checkpoint: no check inside it)
        self._reset_run_state()

    # ------------------------------------------------------------------ state
    def _reset_run_state(self) -> None:
        self.policy.reset_run()
        self.feed.reset()
        self._last_global_step = -1
        self._validations = 0  # values read after a validation run in this fit
        self._logged_in_training: bool | None = None  # is monitor= logged by the training step? (first step)
        self._start_pending = False  # lazy parameters: the starting snapshot waits for the first forward pass
        self._cadence = _Cadence(self.config, self._skipper, self.watch_on)
        self._run: LiveRun | None = None
        self.checkpoint_path: str | None = None
        self._told_of_written_lr = False
        self._weights_only = False  # a weights-only ModelCheckpoint in the run (set when it starts)
        self._weights_only_steps: tuple[int, ...] = ()  # the step intervals at which such checkpoints save

    @property
    def watch_on(self) -> str | None:
        """Where this run's watched value is read: ``check_on`` when given; with ``monitor`` and no ``check_on``,
        where the metric is logged -- ``"train_step"`` when the training step logs it, else ``"validation"``
        (``None`` until the first optimizer step has shown which)."""
        config = self.config
        if config.check_on is not None or config.monitor is None:
            return config.watch_on
        if self._logged_in_training is None:
            return None
        return "train_step" if self._logged_in_training else "validation"

    @property
    def decisions(self) -> list[Decision]:
        """Every decision taken, in order: what was seen and what was done, with the sentence logged."""
        return self._reporter.decisions

    @property
    def _lr_memory(self) -> int:
        """Steps of LRs kept for a warm-up cap: as many as the longest sustained-rise window, where a rise seen
        now may have begun (one value a step, as the loss is watched in a warm-up)."""
        return max((getattr(d, "trend_window", 0) for d in self.policy.detectors.values()), default=0)

    @property
    def detectors(self) -> dict[str, Detector]:
        """The detectors by slot name: ``spike``, ``oscillation``, ``plateau``, ``divergence``, then those of
        ``detectors=[...]`` under their names."""
        return self.policy.detectors

    @property
    def counts(self) -> dict[str, int]:
        """Events seen by kind (spike, oscillation, plateau, divergence, and any other kind a detector reports)
        and actions taken so far: lr_cuts, rollbacks, skipped_batches, snapshots."""
        return self.policy.counts

    def state_dict(self) -> dict[str, Any]:
        """The guard's state for a checkpoint. During training, every value gathered so far is checked first
        (Lightning asks for this state as it saves, before it reads the optimizers' and schedulers'): a rollback
        the values call for happens before the file is written, so a checkpoint never holds the weights of steps
        the guard had not yet checked and would have discarded."""
        if self._fitting and not self._checking and not self.policy.stopped and self._run is not None:
            self._check(self._run.trainer, wait=True)
            self._end_trial()
        state = {"version": STATE_VERSION, **self.policy.state_dict()}
        if self.gate is not None:
            state["gate"] = self.gate.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("detectors", {})
        # a detector sized to the run is built when the run starts (after this): its state is loaded into it then
        self._saved_states = {slot: saved[slot] for slot in self._sized_slots if slot in saved}
        if self._saved_states:
            others = {slot: value for slot, value in saved.items() if slot not in self._saved_states}
            state_dict = {**state_dict, "detectors": others}
        self.policy.load_state_dict(state_dict, warn=_warn)
        if "gate" in state_dict:
            self._skipper.gate_state = state_dict["gate"]  # loaded when the run starts (starting resets the gate)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self._start_fit()
        check_strategy(trainer, type(self).__name__)
        if self.config.check_on == "validation" and not trainer.enable_validation:
            raise ValueError(
                f"{type(self).__name__}: check_on='validation' reads monitor={self.monitor!r} after each validation "
                "run, but this run has no validation loop (a validation_step, a val dataloader and "
                "limit_val_batches > 0), so the guard would watch nothing. Pass check_on='train_step' to read it "
                "after every optimizer step, or add a validation loop"
            )
        if self.check_on == "train_step" and self.monitor is None and not pl_module.automatic_optimization:
            raise ValueError(
                f"{type(self).__name__}: with manual optimization the guard cannot see the loss "
                "training_step returns; log it (self.log('train_loss', loss)) and pass "
                "monitor='train_loss'"
            )

    def _start_fit(self) -> None:
        """Each ``fit`` starts as with a new guard (before Lightning restores a checkpoint's state into it): the
        detectors' state, counters, budget and decisions belong to a run; the settings and detectors to the guard."""
        self.policy.reset()
        self._skipper.gate_state = None
        self._reporter.decisions = []  # a new list: one kept from the last fit stays as it was
        self._saved_states = {}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._reset_run_state()
        self._fitting = True
        self.feed.reset(world_size=int(getattr(trainer, "world_size", 1) or 1))
        self.executor.prepare(trainer.optimizers)
        self._release_schedulers()
        self._compose_schedulers(trainer)
        self._release_optimizers()
        self._lr_hooks = [opt.register_step_pre_hook(self._optimizer_pre_hook) for opt in trainer.optimizers]
        self._last_global_step = trainer.global_step
        self._store = SnapshotStore(
            self.snapshot_device,
            self.snapshot_memory_budget,
            self.snapshot_dir or os.path.join(trainer.default_root_dir, "lr_guard_snapshots"),
            rank=trainer.global_rank,
            state_io=state_io_for(trainer, pl_module, type(self).__name__),
        )
        self._run = LiveRun(trainer, pl_module, self._store, self.feed, self.checkpoint_dir)
        self._weights_only, self._weights_only_steps = _weights_only_checkpoints(trainer)
        if self.watch_on is not None:  # else sized once the first step shows where monitor= is logged
            self._size_detectors(trainer)
        self.policy.start(trainer.global_step)
        self._reporter.attach(trainer, self.settings(), self.detectors, self.counts, self._run.checkpoint_dir)
        self._skipper.reset(self.feed.world_size)
        self._cadence = _Cadence(self.config, self._skipper, self.watch_on)
        self._reporter.per_validation = self.watch_on == "validation"
        if self.rollback:
            self._start_pending = True
            self._take_start_snapshot(trainer, pl_module)

    def _take_start_snapshot(self, trainer: Any, pl_module: Any) -> None:
        """Snapshot the state training starts from. Lazy parameters (``nn.LazyLinear``) have no shape until the
        first forward pass: the snapshot then waits for the first optimizer step, before its update lands (the
        buffers, BatchNorm statistics, hold that forward pass), and the run counts as starting there."""
        if any(nn.parameter.is_lazy(p) for p in pl_module.parameters()):
            return
        self._start_pending = False
        step = trainer.global_step
        if self.policy.good is None or self.policy.good.step != step:
            self.policy.start(step)
        if not self.config.dry_run:  # a dry run restores nothing: the rules keep the step alone
            self._store.take(step, targets(trainer, pl_module), self._copies())
            self._run.snapshot_taken(step)  # type: ignore[union-attr]
        self._begin_sweep(trainer)

    def _begin_sweep(self, trainer: Any) -> None:
        """With ``lr_search``: the in-run LR range test, from the starting snapshot just taken (once per fit; a
        resumed fit whose sweep is done does not sweep again)."""
        config, search = self.config, self.policy.search
        if not (config.lr_search and config.lr_search_sweep_steps) or search.swept or search.sweep is not None:
            return
        if self.watch_on != "train_step" or not trainer.optimizers:
            return  # the sweep reads the loss of every step
        peak, how = schedule_peak(trainer, _total_steps(trainer))
        if not peak > 0:
            return
        step = trainer.global_step
        lrs = sweep_lrs(peak, config.lr_search_sweep_steps)
        intent = self.policy.begin_sweep(step, lrs, peak, sweep_divergence_detector(), how)
        self._reporter.decision(self.executor.execute(intent, self._run))  # type: ignore[arg-type]

    def _sweep_lr(self, step: int) -> None:
        """Before an optimizer step of the sweep: every group's LR factor set so that the first group of the
        first optimizer steps with the sweep's LR of ``step`` (the others keep their ratio to it)."""
        sweep = self.policy.search.sweep
        lr = sweep.lr_at(step) if sweep is not None else None
        if lr is None:
            return
        optimizers = self._run.trainer.optimizers  # type: ignore[union-attr]
        group = optimizers[0].param_groups[0]
        factor = lr / float(group.get(UNSCALED, group["lr"]))
        set_lr_factors(optimizers, [[factor] * len(o.param_groups) for o in optimizers])

    def _after_sweep(self) -> None:
        """The sweep was read and rolled back: the update gate starts afresh, as the run does."""
        if self.gate is not None:
            self.gate.reset()

    def _copies(self) -> int:
        policy = self.policy  # a good and a pending one, the starting state until progress, a progress mark
        return 2 + len({mark.step for mark in (policy.origin, policy.progress_mark) if mark is not None})

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._fitting = False
        self._skipper.after_step()
        if self._run is not None:
            self._run.release()
        self._release_schedulers()
        self._release_optimizers()
        self._store.close()

    def _compose_schedulers(self, trainer: Any) -> None:
        """Compose the Trainer's schedulers with the guard's cuts, also one that appears during the run (SWA's
        ``SWALR`` at ``swa_epoch_start``); each is remembered, so that teardown leaves every one as it was, also
        one the run has dropped since."""
        composed = self._composed
        for scheduler in schedulers(trainer):
            if not any(scheduler is known for known in composed):
                compose_with_scheduler(scheduler)
                composed.append(scheduler)

    def _release_schedulers(self) -> None:
        for scheduler in self._composed:
            release_scheduler(scheduler)
        self._composed = []

    def _release_optimizers(self) -> None:
        for hook in self._lr_hooks:
            hook.remove()
        self._lr_hooks = []

    def _optimizer_pre_hook(self, optimizer: Any, args: Any = (), kwargs: Any = None) -> None:
        """Before every optimizer step: take up an LR written by hand, and keep the LRs it steps with (a cap is
        read from those of the step where trouble began)."""
        self._before_optimizer_step(optimizer)
        if self.policy.search.sweep is not None:
            self._sweep_lr(self._last_global_step)
        if self._cadence.note_lrs:
            self._run.note_lrs(self._last_global_step)  # type: ignore[union-attr]

    def _before_optimizer_step(self, optimizer: Any, args: Any = (), kwargs: Any = None) -> None:
        """Every optimizer step: an LR the user wrote by hand (a manual warm-up in ``optimizer_step``) is taken as
        the schedule's, and the guard's cuts apply on top of it."""
        changes = take_up_written_lrs(optimizer)
        if changes and not self._told_of_written_lr:
            self._told_of_written_lr = True
            change = changes[0]
            self._reporter.note(
                f"an LR was set by hand ({change.old:.3g}, e.g. in optimizer_step); the guard takes it as your "
                f"schedule's LR and applies its cuts on top: it steps with {change.new:.3g}. Write the LR itself "
                "(pg['lr'] = scale * base_lr): scaling the LR you read (pg['lr'] *= g) would compound with the "
                "guard's cuts; use an LR scheduler (LambdaLR) for that"
            )

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # Lightning does not call callbacks' teardown when training raises: leave the schedulers as they were.
        self.teardown(trainer, pl_module, "fit")

    # the hooks below run at every step: the common case (nothing to skip, no copy running) costs a test each
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        cadence = self._cadence
        if cadence.gate:
            self._run.where[trainer.global_step] = (trainer.current_epoch, batch_idx)  # type: ignore[union-attr]
        if self._skips.left > 0 or cadence.skipper:
            self._skipper.batch_start(pl_module)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        if self._cadence.step_loss:
            self._skipper.backward(loss)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self._start_pending:
            self._take_start_snapshot(trainer, pl_module)
        if self._store.copying:
            self._store.fence()  # the step overwrites what a snapshot may still be copying (GPU only)
        if self._skips.left > 0 or self._cadence.skipper:
            self._skipper.before_step(trainer, pl_module, optimizer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.policy.stopped:
            return
        global_step = trainer.global_step  # a computed property in Lightning: read it once
        cadence = self._cadence
        if cadence.gate:
            self._skipper.after_step()
        if cadence.version != self.config.version:  # a setting changed during the run: it takes effect now
            cadence = self._cadence = _Cadence(self.config, self._skipper, self.watch_on)
        if cadence.loss_per_batch:
            self.feed.add_micro_batch(outputs)
        if global_step == self._last_global_step:
            return  # a micro-batch of gradient accumulation: no optimizer step yet
        if cadence.choose_watch_on:
            cadence = self._cadence = self._choose_watch_on(trainer)
        step, self._last_global_step = self._last_global_step, global_step  # the step this batch trained
        if self._run.metrics_due == step:  # type: ignore[union-attr]
            self._run.note_metrics()  # type: ignore[union-attr]
        self.feed.end_step(step, trainer, cadence.every_step)
        snapshot_due = cadence.snapshot_every and global_step % cadence.snapshot_every == 0
        every = self._weights_only_steps  # a weights-only checkpoint saved after this hook: its weights checked
        weights_only_due = bool(every) and any(global_step % n == 0 for n in every)
        sweep = self.policy.search.sweep
        sweep_done = sweep is not None and global_step >= sweep.start + len(sweep.lrs)  # read it now, not later
        if snapshot_due or global_step % cadence.check_every == 0 or weights_only_due or sweep_done:
            self._check(trainer, wait=weights_only_due or sweep_done)
        if snapshot_due and not self._start_pending and self.policy.wants_snapshot(global_step):
            if not self.config.dry_run:  # a dry run restores nothing: the rules keep the step alone
                self._store.take(global_step, targets(trainer, pl_module), self._copies())
                self._run.snapshot_taken(global_step)  # type: ignore[union-attr]
            self.policy.snapshot_taken(global_step)

    def _choose_watch_on(self, trainer: Any) -> _Cadence:
        """``monitor=`` without ``check_on``, at the first optimizer step: watch the metric where it is logged --
        after every step if the training step logs it, else after each validation run; with neither, say so."""
        monitor = self.monitor
        metrics = trainer.callback_metrics
        self._logged_in_training = monitor in metrics
        if not self._logged_in_training and not trainer.enable_validation:
            raise ValueError(
                f"{type(self).__name__}: monitor={monitor!r} is not logged by the training step (after the first "
                f"optimizer step the metrics are: {', '.join(sorted(metrics)) or 'none'}) and this run has no "
                "validation loop, so the guard would watch nothing. Log it in training_step "
                f"(self.log({monitor!r}, ...)) or in a validation loop, or pass monitor= one of the metrics above"
            )
        if self.verbose and trainer.is_global_zero:
            log.info("lr_guard: watching monitor=%r %s", monitor, _WHERE[self.watch_on or ""])
        if self._size_detectors(trainer):
            self._reporter.describe(trainer, self.settings(), self.detectors)
        self._reporter.per_validation = self.watch_on == "validation"
        return _Cadence(self.config, self._skipper, self.watch_on)

    def _size_detectors(self, trainer: Any) -> bool:
        """The built-in detectors left at their default, sized to how the run is fed and how long it is: per
        validation, the plateau and divergence rules count validations (torch's patience of 10 for plateaus); per
        step, the plateau detector's patience is a tenth of the run (``max_steps``, or the steps ``max_epochs``
        make). A checkpoint's state for them is loaded now. Whether anything was replaced."""
        assert self.watch_on is not None
        total = _total_steps(trainer) if self.watch_on == "train_step" else None
        replaced = False
        for slot in sorted(self._sized_slots):
            detector = sized_detector(slot, self.watch_on, total)
            if detector is not None:
                self.policy.replace_detector(slot, detector, self._saved_states.pop(slot, None), _warn)
                replaced = True
        for slot, state in self._saved_states.items():  # the constructor's default fits: load the state into it
            self.policy.replace_detector(slot, self.detectors[slot], state, _warn)
        self._saved_states = {}
        return replaced

    def _check(self, trainer: Any, wait: bool = False) -> None:
        """Send the values gathered since the last check on their way to the host (one batch: one copy, and
        under DDP one collective), and run the policy on every value that has arrived (all of them with
        ``wait``)."""
        self._checking = True
        try:
            self._take_up_written_lrs(trainer)
            self._compose_schedulers(trainer)
            self._note_schedule(trainer)
            self.feed.send(trainer)
            arrived = self.feed.arrived(wait)
            if arrived:
                self._process(trainer, arrived)
        finally:
            self._checking = False

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.policy.stopped:
            self._check(trainer, wait=True)
        if self._run is not None:
            self._run.put_back_metrics()  # before EarlyStopping and ModelCheckpoint read them

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or self.policy.stopped:
            return
        if self.check_on != "validation":
            if self._weights_only and self._fitting:  # a weights-only ModelCheckpoint saves next
                self._check(trainer, wait=True)
            return
        assert self.monitor is not None  # checked at construction
        self._take_up_written_lrs(trainer)
        self._validations += 1
        self.feed.push_now(trainer, trainer.global_step, self.feed.metric(trainer, self.monitor))
        self._process(trainer, self.feed.arrived(wait=True))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._reporter.finish()
        if self.watch_on == "validation" and not self._validations and trainer.is_global_zero:
            log.warning(
                "lr_guard: monitor=%r is read after each validation run, and none ran in these %d steps, so the "
                "guard watched nothing. Validate within the run (val_check_interval, check_val_every_n_epoch) or "
                "log the metric in training_step and pass check_on='train_step'",
                self.monitor,
                trainer.global_step,
            )

    def _take_up_written_lrs(self, trainer: Any) -> None:
        """Before a check: what the decisions report, and the warm-up the policy reads, include an LR written by
        hand since the last step."""
        for optimizer in trainer.optimizers:
            self._before_optimizer_step(optimizer)

    def _note_schedule(self, trainer: Any) -> None:
        """Is the user's schedule raising the LR (a warm-up)? Read on the first param group's unscaled LR."""
        optimizers = trainer.optimizers
        if not optimizers:
            return
        group = optimizers[0].param_groups[0]
        self.policy.note_lr(group.get(UNSCALED, group["lr"]), trainer.global_step, float(group["lr"]))

    # ------------------------------------------------------------------ carrying out the policy
    def _end_trial(self) -> None:
        """A checkpoint is being written: an LR trial under way is judged now, or rolled back (its state is not
        one to resume from)."""
        sweeping = self.policy.search.sweep is not None
        intent = self.policy.end_trial()
        if intent is not None:
            assert self._run is not None
            self._reporter.decision(self.executor.execute(intent, self._run))
            self._store.keep_only(self.policy.kept_steps())
        if sweeping:
            self._after_sweep()

    def _process(self, trainer: Any, values: list[tuple[int, Any]]) -> None:
        assert self._run is not None
        reporter = self._reporter
        sweeping = self.policy.search.sweep is not None
        self.executor.process(values, self._run, reporter.decision, reporter.value if reporter.logs_values else None)
        self._run.forget_before(values[-1][0])
        if self._cadence.note_lrs:
            self._run.forget_lrs(self.policy.lr_steps_kept(), values[-1][0], self._lr_memory)
        self.checkpoint_path = self._run.checkpoint_path
        self._store.keep_only(self.policy.kept_steps())  # free what the rules can no longer restore
        if sweeping and self.policy.search.sweep is None:
            self._after_sweep()


_WHERE = {
    "train_step": "after every optimizer step (the training step logs it)",
    "validation": "after each validation run (the training step does not log it)",
}


class _Cadence:
    """What the hooks do at every step, read from the settings when they change (the hooks run at every step)."""

    def __init__(self, config: GuardConfig, skipper: UpdateSkipper, watch_on: str | None) -> None:
        self.version = config.version
        self.gate = skipper.gate is not None
        self.skipper = config.skip_spikes or self.gate  # a skip may come at any step
        self.step_loss = skipper.needs_loss
        self.choose_watch_on = watch_on is None  # monitor= without check_on: chosen at the first optimizer step
        self.every_step = watch_on == "train_step"
        self.loss_per_batch = self.every_step and config.monitor is None  # sum the micro-batches' losses
        self.snapshot_every = config.snapshot_every if config.rollback else 0
        self.check_every = 1 if config.skip_spikes else config.check_every_n_steps
        self.note_lrs = config.rollback and config.warmup_cap_factor is not None  # the LR a cap is read from


def _warn(text: str) -> None:
    log.warning("lr_guard: %s", text)


def _total_steps(trainer: Any) -> int | None:
    """The optimizer steps the run will take: ``max_steps``, else what ``max_epochs`` makes (Lightning's estimate,
    which needs the training data's length); ``None`` when neither bounds it."""
    max_steps = int(getattr(trainer, "max_steps", -1) or -1)
    if max_steps > 0:
        return max_steps
    total = trainer.estimated_stepping_batches  # inf for data with no length
    return int(total) if isinstance(total, (int, float)) and math.isfinite(total) and total > 0 else None


def _assemble(switches: dict[str, Any], extra: list[Detector], gate: UpdateGate | None) -> dict[str, Detector]:
    """The guard's detectors: the built-in ones, the user's, and with the gate on one that watches the gradient
    norm for a blow-up (it leads the loss: its divergence warns, a loss spike soon after confirms it). Only a
    blow-up counts there -- 20x its best level at once, or 5x smoothed -- since a gradient norm drifts by more
    than 2x in a healthy run. A value also 20x the untrained gradient norm counts at once (``far_at_once``)."""
    built_in = []
    if gate is not None and switches["divergence"] is not False and all(d.signal != GRAD_NORM for d in extra):
        built_in.append(
            DivergenceDetector(
                factor=5.0,
                instant_factor=20.0,
                trend_window=0,
                far_at_once=True,
                name="grad_norm_divergence",
                signal=GRAD_NORM,
            )
        )
    return build_detectors(switches, [*extra, *built_in])


def _check_combinations(config: GuardConfig, detectors: dict[str, Detector], gate: UpdateGate | None) -> None:
    """Settings that are valid alone but not together."""
    if config.dry_run and gate is not None:
        raise ValueError(
            "dry_run=True cannot be combined with gate=True: the update gate scales or skips an update on the "
            "device before it lands, which a dry run does not do. Pass gate=False for a dry run"
        )
    spike = detectors["spike"]
    if config.skip_spikes and not (isinstance(spike, SpikeDetector) and spike.signal == "loss"):
        raise ValueError(
            "skip_spikes=True needs the spike detector on the loss: leave spike=True or pass a SpikeDetector "
            "with signal='loss'"
        )
    if config.lr_search and (config.dry_run or not config.rollback):
        given = "dry_run=True" if config.dry_run else "rollback=False"
        raise ValueError(
            f"lr_search=True cannot be combined with {given}: each trial of a higher LR is made from a snapshot and "
            "rolled back when it fails, which needs rollback=True and dry_run=False. Pass lr_search=False, or "
            "rollback=True and dry_run=False"
        )
    if config.watch_on == "validation" and config.monitor is None:
        raise ValueError(
            "check_on='validation' needs monitor=, the name of the metric to read after each validation "
            "(e.g. monitor='val_loss'); or leave check_on unset to watch the training loss"
        )


def _weights_only_checkpoints(trainer: Any) -> tuple[bool, tuple[int, ...]]:
    """Whether a ``ModelCheckpoint(save_weights_only=True)`` is in the run (its saves do not ask the guard for its
    state, so nothing checks the values first), and the step intervals at which such checkpoints save
    (``every_n_train_steps``). Lightning runs checkpoint callbacks after the others, so a check the guard makes in
    the same hook comes before the save."""
    saving = [cb for cb in getattr(trainer, "checkpoint_callbacks", []) if getattr(cb, "save_weights_only", False)]
    steps = {int(getattr(cb, "_every_n_train_steps", 0) or 0) for cb in saving}
    return bool(saving), tuple(sorted(n for n in steps if n > 0))


def _gate(gate: UpdateGate | bool | None, dry_run: bool) -> UpdateGate | None:
    """The update gate: on by default (``None``), except in a dry run, which changes no update."""
    if gate is None:  # never a host sync per step: it stands aside where a skip cannot be taken on the device
        return None if dry_run else UpdateGate(sync_fallback=False)
    if isinstance(gate, bool):
        return UpdateGate() if gate else None
    if isinstance(gate, UpdateGate):
        return gate
    raise TypeError(f"gate must be None (on, the default), True, False or an lr_guard UpdateGate, got {gate!r}")


def _as_list(detectors: Detector | Iterable[Detector] | None) -> Iterable[Detector]:
    if detectors is None:
        return []
    if isinstance(detectors, Detector):
        return [detectors]
    if isinstance(detectors, (str, bytes)) or not isinstance(detectors, Iterable):
        raise TypeError(f"detectors must be a list of lr_guard Detector instances, got {detectors!r}")
    return detectors
