"""What the guard does about what it sees: the decisions, without the training state (pure Python).

``GuardPolicy`` feeds the detectors, keeps track of which snapshot is the last good one, and turns every event
into an :class:`Intent`: roll back to step N with the LR times f, cut the LR, skip, stop, hold or just log. The
Lightning callbacks carry the intents out on a live training run; ``lr-guard replay`` carries them out on paper
over a finished run's log. One set of rules serves both, so a replay says what the guard would really have done.
The policy owns its state -- the counters, the snapshot marks, the updates to skip -- and is told the outcome of
what it asked for (:meth:`GuardPolicy.lr_cut_made`, :meth:`GuardPolicy.should_skip`); nobody else writes it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from lr_guard.detectors import Detector, NullDetector
from lr_guard.events import Action, Event, EventKind, kind_name
from lr_guard.lr_search import COUNTS as SEARCH_COUNTS
from lr_guard.lr_search import LR_SEARCH, SWEEP_HIGH, SWEEP_LOW, LRSearch, Sweep, Trial, Verdict, Z, placed_peak
from lr_guard.skips import NON_FINITE, SKIPPED, SkipLedger
from lr_guard.update_responses import GRAD_NORM, UpdateResponses

if TYPE_CHECKING:
    from lr_guard.config import GuardConfig

__all__ = ["GuardPolicy", "Intent", "SnapshotMark"]

# A plateau before the loss has got this much (relative) below where training started is a failed start
RESTART_PROGRESS = 0.05
# ... once it has gone this many values without improvement (the smallest patience the per-step defaults had
# before the patience became a share of the run): a shorter flat stretch early in a run is logged, not restarted
RESTART_MIN_VALUES = 100
# Non-finite steps in a row that the update gate skips before they count as a lasting divergence: rolled back,
# within the rollback budget, as the detectors would (a NaN update never lands, but a run of NaNs is not one
# batch). 16: recurring bad samples (a third of the batches hold one) almost never give 16 in a row (0.36**16)
LASTING_NON_FINITE = 16

# Why a first rollback keeps the LR: one value blew up after a calm stretch, outside a warm-up
BAD_BATCH = "LR factor kept: a sudden blow-up after a calm stretch is a bad batch, not a too-high LR"
# Why a rollback caps the LR instead of cutting it: the trouble began while the schedule's LR was rising
WARMUP_CAP = "the trouble began while the schedule's LR was rising: the warm-up passed where training stays stable"
# Why a plateau rolls back and caps the LR: it lost ground while the schedule's LR was rising
WARMUP_PLATEAU = (
    "the loss stopped improving while the schedule's LR was rising: the warm-up passed where the loss still falls"
)
# The kinds of event that are the first sign of trouble (a plateau is none)
TROUBLE = (EventKind.SPIKE.value, EventKind.OSCILLATION.value, EventKind.DIVERGENCE.value)

KINDS = tuple(kind.value for kind in EventKind)  # counted even when no detector of the kind is on
ACTIONS_COUNTED = ("lr_cuts", "rollbacks", "skipped_batches", "snapshots")
LOSS = "loss"  # the signal the built-in detectors read: the watched loss (or monitored metric)
GATE = "gate"  # the update gate's verdict on each step (a code of lr_guard.skips)


@dataclass(frozen=True)
class Intent:
    """What the policy wants done about one event."""

    event: Event
    action: Action
    lr_factor: float = 1.0  # multiply the LR by this (cuts and rollbacks)
    rollback_to: int | None = None  # the snapshot step to restore (rollback and stop)
    skip_batches: int = 0
    reason: str = ""  # why an action was held or only logged
    cap_at: int | None = None  # a rollback that caps the LR: at warmup_cap_factor x the LR of this step
    from_snapshot: bool = False  # a rollback whose lr_factor scales the restored LR state, not the current one


@dataclass
class SnapshotMark:
    """A snapshot's step and the detectors' state at that moment (the training state itself is the caller's)."""

    step: int
    detectors: dict[str, Any]


class GuardPolicy(UpdateResponses):
    """The guard's rules.

    * A snapshot is wanted every ``snapshot_every`` steps while every detector is quiet and none is pending; it
      becomes the good one once the values over ``confirm_steps`` optimizer steps after it are healthy (finite,
      no spike or divergence, detectors quiet): one value per step when the loss is watched, the first validation
      that many steps on when a validation metric is; an unhealthy value discards it.
    * Divergence: roll back to the good snapshot with the LR times ``rollback_factor`` and ``skip_batches``
      skipped; after ``max_rollbacks`` rollbacks with no newly confirmed snapshot, stop (restoring it first).
      The detectors are put back to their state at the snapshot. A bad batch keeps the LR
      (``keep_lr_on_bad_batch``): when the first rollback of an incident is set off by one sudden value (non-finite
      or blown up) after at least ``confirm_steps`` optimizer steps without any event, outside a warm-up, the LR was not
      to blame, and the data stream has moved past the batch; if the trouble comes back, the next rollback cuts.
      The warm-up as a range test (``warmup_cap_factor``): when the incident's first event (a spike, oscillation
      or divergence after the good snapshot) began while the schedule's LR was rising (or it has risen since, or
      is rising now), the first such rollback of the fit keeps the LR factor and caps the LR at
      ``warmup_cap_factor`` times the LR of the step where that event began (:attr:`Intent.cap_at`; a sustained
      rise begins at its window's lowest value, so a rise seen just after a warm-up ended is capped at the LR it
      began at); a later one cuts as usual.
    * Plateau / oscillation: cut the LR by ``plateau_factor`` / ``oscillation_factor``, or log only when that is
      ``None``; a plateau cut is held while the schedule's LR is rising (``lr_rising``). A warm-up plateau is
      answered otherwise: when the plateau's level has lost ground since its best (``progress_lost``) and that
      best (its ``began``) came before a warm-up's last LR rise (a rise at two or more steps with no fall between,
      or the LR rising now), the warm-up carried the LR past where the loss still falls, as a range test reads
      it. The first such plateau of the fit (if no rollback has capped the LR) rolls back to the latest snapshot
      no later than that best (the progress mark, kept during a warm-up) and caps the LR at
      ``warmup_cap_factor`` times the LR of that step; with no such snapshot, its cut also sets the cap.
    * A failed start: a plateau while the progress detector's (the plateau detector's) best mean is less than
      ``RESTART_PROGRESS`` (5%) better than the first value, after ``RESTART_MIN_VALUES`` (100) values without
      improvement (a shorter flat stretch is logged) -- training has learned nothing, typically because a
      too-high LR broke the model in its first steps (dead ReLUs), which no LR cut can undo. Restart from the
      state training started from (``origin``, kept until the loss makes that progress) with the LR times
      ``rollback_factor``; at most ``max_rollbacks`` times, after which plateaus get ordinary LR cuts. Nothing
      is lost by the restart: the discarded steps had made no progress.
    * A divergence of the gradient norm (a detector of signal ``"grad_norm"``) is a warning: a spike of the
      loss within ``GRAD_CONFIRM_STEPS`` (10) steps confirms it, and is rolled back at once, before the loss's
      own divergence rules would fire.
    * With ``lr_search``: the upward LR search of :mod:`lr_guard.lr_search` -- a trial of a higher LR from a
      snapshot while the loss falls steadily and quietly, kept if the loss falls faster than its trend, rolled
      back otherwise (also on any event of a trial step), never to the ceiling that failed trials, divergences and
      LR cuts set. No periodic snapshot is taken during a trial.
    * Spike, and any kind without a response of its own: logged. A step whose update was skipped before it was
      applied is reported as skipped, and a non-finite value there needs no rollback.

    The response to an event is chosen by its kind alone (:attr:`responses`), so a user's detector of kind
    ``"divergence"`` rolls back like the built-in one, and a detector of a new kind is counted and logged.

    ``detectors``: by slot name, fed in this order; ``config``: a :class:`~lr_guard.config.GuardConfig`.
    """

    def __init__(self, detectors: Mapping[str, Detector], config: GuardConfig) -> None:
        self.detectors = dict(detectors)
        self.config = config
        kinds = [kind_name(d.kind) for d in self.detectors.values() if not isinstance(d, NullDetector)]
        self.counts = dict.fromkeys(KINDS + tuple(k for k in dict.fromkeys(kinds) if k not in KINDS), 0)
        self.counts.update(dict.fromkeys(ACTIONS_COUNTED, 0))
        if config.lr_search:
            self.counts.update(dict.fromkeys(SEARCH_COUNTS, 0))
        self.search = LRSearch(config)
        self._counted = tuple(self.counts)  # the counters a new policy starts with
        self.responses: dict[str, Callable[[Event, int], Intent]] = {
            EventKind.DIVERGENCE.value: self._on_divergence,
            EventKind.PLATEAU.value: self._on_plateau,
            EventKind.OSCILLATION.value: self._on_oscillation,
            EventKind.SPIKE.value: self._on_spike,
        }
        self.incident_rollbacks = 0
        self.restarts = 0  # failed starts restarted (kept across a resume, like the counters)
        self.capped = False  # a warm-up's rollback has capped the LR (kept across a resume)
        self.skips = SkipLedger()
        self._non_finite_streak, self._non_finite_step = 0, -2  # non-finite steps in a row the gate skipped
        self._index_detectors()
        self.reset_run()

    def _index_detectors(self) -> None:
        self._active = [d for d in self.detectors.values() if not isinstance(d, NullDetector)]
        self._loss_active = [d for d in self._active if d.signal == LOSS]
        self._signal_of = {d.name: d.signal for d in self._active}  # which signal an event's detector reads
        progress = [d for d in self._active if d.tracks_progress and d.signal == LOSS]
        self._progress: Detector | None = progress[0] if progress else None

    def _detector_named(self, name: str) -> Detector:
        return next((d for d in self._active if d.name == name), NullDetector())

    def replace_detector(
        self,
        slot: str,
        detector: Detector,
        state: Mapping[str, Any] | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        """Put ``detector`` in ``slot`` before it has seen a value of this run (e.g. a plateau detector sized to
        the run), with a checkpoint's ``state`` for it if one was saved; the snapshot marks taken so far hold its
        state from now on; ``warn`` hears of a state written by another class (the detector then stays fresh)."""
        self.detectors[slot] = detector
        if state is not None:
            load_detector_states({slot: detector}, {slot: state}, warn)
        for mark in (self.good, self.pending, self.origin):
            if mark is not None:
                mark.detectors[slot] = detector.state_dict()
        self._index_detectors()

    @property
    def signals(self) -> set[str]:
        """The signals the active detectors read."""
        return {d.signal for d in self._active}

    def reset(self) -> None:
        """A new fit: back to what a new policy holds -- fresh detectors, counters at zero, a full budget of
        rollbacks and restarts, nothing to skip. The settings and the detector objects are kept."""
        for detector in self.detectors.values():
            detector.reset()
        self.counts.clear()  # in place: the reporter reads this dict
        self.counts.update(dict.fromkeys(self._counted, 0))
        self.incident_rollbacks = 0
        self.restarts = 0
        self.capped = False
        self.skips.left = 0
        self.search.reset()
        self._non_finite_streak, self._non_finite_step = 0, -2  # non-finite steps in a row the gate skipped
        self.reset_run()

    def reset_run(self) -> None:
        """Forget the snapshots and per-run flags (the counters and detectors stay)."""
        self.good: SnapshotMark | None = None
        self.pending: SnapshotMark | None = None
        self.origin: SnapshotMark | None = None  # where training started, kept for a restart until progress
        self.progress_mark: SnapshotMark | None = None  # a good snapshot before the best level, for a warm-up plateau
        self.skips.reset_run()
        self.lr_rising = False  # the schedule's LR is rising (a warm-up): see note_lr
        self._last_lr: float | None = None
        self._last_lr_step: int | None = None
        self._lr_rose_at: int | None = None  # the last step at which the schedule's LR rose
        self._rises = 0  # the steps at which it rose since it last fell
        self._warmup_rose_at: int | None = None  # the last step it rose at with another rise before, no fall between
        self.stopped = False
        self._calm_from: int | None = None  # the first step of the current stretch of values with no event
        self._calm_ended: tuple[int, int] | None = None  # the step of the event that ended the last calm, its length
        self._grad_warning: int | None = None  # the step of a gradient-norm divergence the loss may confirm
        self.search.trial = None
        self.search.sweep = None
        # where the first event since the good snapshot began (its ``began``: a sustained rise's lowest value)
        self.trouble_from: int | None = None
        self._trouble_rising = False  # was the schedule's LR rising then, or has it risen since?

    def note_lr(self, lr: float, step: int, effective: float | None = None) -> None:
        """The schedule's own LR (without the guard's cuts) at ``step``, and the ``effective`` one the optimizer
        steps with (for the LR search); higher than at the last step noted means a warm-up is under way
        (``lr_rising``). A second note at the same step changes nothing: the schedule has not moved since the
        first."""
        if effective is not None:
            self.search.note_lr(lr, effective)
        if step == self._last_lr_step:
            return
        last = self._last_lr
        self.lr_rising = last is not None and lr > last * (1 + 1e-9)
        if self.lr_rising:
            self._lr_rose_at = step
            self._rises += 1
            if self._rises >= 2:  # a warm-up rises again and again; a warm restart jumps once, then decays
                self._warmup_rose_at = step
        elif last is not None and lr < last * (1 - 1e-9):
            self._rises = 0
        self._last_lr, self._last_lr_step = lr, step

    # -- outcomes ----------------------------------------------------------------------------------------------
    def lr_cut_made(self) -> None:
        """An LR cut asked for was made (it is not when every group is at ``min_lr``)."""
        self.counts["lr_cuts"] += 1

    # -- snapshots ---------------------------------------------------------------------------------------------
    def quiet(self) -> bool:
        """Nothing is building up: the moment to take, or confirm, a snapshot of a good state."""
        return all(d.quiet for d in self._active)

    def detector_state(self) -> dict[str, Any]:
        return {name: d.state_dict() for name, d in self.detectors.items()}

    def start(self, step: int) -> None:
        """Training starts (or resumes) at ``step``: its state is good by definition."""
        self.good = SnapshotMark(step, self.detector_state()) if self.config.rollback else None
        watches_progress = self._progress is not None
        self.origin = self.good if watches_progress and self.restarts < self.config.max_rollbacks else None

    def kept_steps(self) -> set[int]:
        """The steps whose snapshots the rules may still restore."""
        kept = {mark.step for mark in (self.good, self.pending, self.origin, self.progress_mark) if mark is not None}
        trial = self.search.trial
        if trial is not None and trial.start is not None:
            kept.add(trial.start)
        return kept

    def lr_steps_kept(self) -> set[int]:
        """The steps whose LRs a warm-up cap may still read: where the trouble under way began, and where each
        plateau detector's progress stopped (its ``best_step``)."""
        steps = {self.trouble_from} if self.trouble_from is not None else set()
        for detector in self.detectors.values():
            best = getattr(detector, "best_step", None)
            if isinstance(best, int):
                steps.add(best)
        return steps

    def wants_snapshot(self, step: int) -> bool:
        return (
            self.config.rollback
            and not self.stopped
            and self.pending is None
            and self.search.trial is None
            and self.search.sweep is None
            and step % self.config.snapshot_every == 0
            and self.quiet()
        )

    def snapshot_taken(self, step: int) -> None:
        self.pending = SnapshotMark(step, self.detector_state())
        self.counts["snapshots"] += 1

    def _confirm(self, step: int, healthy: bool) -> None:
        if self.pending is None or step < self.pending.step:
            return
        if not healthy:
            self.pending = None
            return
        # confirmed by healthy values over confirm_steps optimizer steps: one per step when the loss is watched,
        # the first validation that far on when a validation metric is
        if step - self.pending.step + 1 >= self.config.confirm_steps:
            self._keep_progress_mark()
            self.good, self.pending = self.pending, None
            self.incident_rollbacks = 0
            self.trouble_from = None

    # -- decisions ---------------------------------------------------------------------------------------------
    def _update_signals(self, step: int, values: Mapping[str, float]) -> tuple[list[Event] | None, float]:
        events = None
        for detector in self._active:
            if detector.signal in values:
                event = detector.update(values[detector.signal], step)
                if event is not None:
                    events = [event] if events is None else [*events, event]
        return events, values.get(LOSS, 0.0)  # no loss at this step: only the other signals speak to its health

    def observe(self, step: int, values: float | Mapping[str, float]) -> list[Intent]:
        """Feed the values of one step -- the loss as a number, or several signals by name (``{"loss": ...}``)
        -- and return what should be done, in order (a rollback or stop ends the list)."""
        if self.stopped:
            return []
        if self.search.sweep is not None:  # the in-run range test: its values are its own
            return self._swept(step, values)
        gated = None
        if values.__class__ is float or not isinstance(values, Mapping):  # the common case: the loss alone
            loss = values
            events = None
            for detector in self._loss_active:
                event = detector.update(values, step)
                if event is not None:
                    events = [event] if events is None else [*events, event]
        else:
            code = int(values.get(GATE, 0))
            if code:
                gated = self._gated(step, values, code)
                if code in SKIPPED:  # not applied: its values describe a batch, not the model
                    return [gated, *self._lasting_non_finite(step, gated, code)]
            events, loss = self._update_signals(step, values)
        if self.pending is not None:
            healthy = (
                math.isfinite(loss)
                and self.quiet()
                and not (events and any(e.kind in (EventKind.SPIKE, EventKind.DIVERGENCE) for e in events))
            )
            self._confirm(step, healthy)
        if self.skips.steps:
            self.skips.observing(step)
        if self.origin is not None and self._progress is not None and self._progress.progress >= RESTART_PROGRESS:
            self.origin = None  # training got going: no restart from scratch any more
        calm_from = self._calm_from
        if calm_from is None:
            calm_from = self._calm_from = step
        if not events:
            if self.config.lr_search and gated is None:
                searched = self._search(step, loss)
                if searched is not None:
                    return [searched]
            return [gated] if gated is not None else []
        calm_before, self._calm_from = step - calm_from, step + 1  # optimizer steps with no event before this
        began = min(  # a plateau's began is where progress stopped, not a value that set off trouble
            (e.began for e in events if e.began is not None and kind_name(e.kind) != EventKind.PLATEAU.value),
            default=step,
        )
        calm_here = calm_before
        if began < step:  # confirmed by the values after it: the calm is the one before its first value
            calm_before = self._calm_before(began, calm_from)
        if calm_here:
            self._calm_ended = (step, calm_here)
        troubles = [e for e in events if kind_name(e.kind) in TROUBLE]
        if self.trouble_from is None and troubles:  # where the first trouble began (a slow rise: well before)
            first = min((e.began for e in troubles if e.began is not None), default=step)
            rose = self._lr_rose_at is not None and self._lr_rose_at >= first
            self.trouble_from, self._trouble_rising = first, self.lr_rising or rose
        intents = [gated] if gated is not None else []
        if self.config.lr_search:
            trial = self.search.trial
            if trial is None:
                self.search.history = []  # an event: no longer quiet
            elif trial.start is not None and any(e.step >= trial.start for e in events):
                for event in events:  # the raise is to blame: undone by its rollback, which answers them all
                    kind = kind_name(event.kind)
                    self.counts[kind] = self.counts.get(kind, 0) + 1
                first = min(events, key=lambda e: e.step)
                intents.append(self._trial_failed(first.step, first.value, first.message, "it set off an event"))
                self.skips.done(step)
                return intents
            else:
                intents.append(self._trial_undone(events[0]))
        for event in sorted(events, key=lambda e: e.kind != EventKind.DIVERGENCE):
            kind = kind_name(event.kind)
            self.counts[kind] = self.counts.get(kind, 0) + 1
            intent = self._decide(event, calm_before)
            intents.append(intent)
            if intent.action in (Action.ROLLBACK, Action.STOP) or (
                intent.action == Action.SKIP and event.kind == EventKind.DIVERGENCE
            ):
                break
        self.skips.done(step)
        return intents

    def _calm_before(self, began: int, calm_from: int) -> int:
        """Optimizer steps with no event before step ``began``, which other events may have followed."""
        ended = self._calm_ended
        if ended is not None and ended[0] >= began:
            return max(0, ended[1] - (ended[0] - began))
        return max(0, began - calm_from)

    def _decide(self, event: Event, calm_before: int) -> Intent:
        if event.step in self.skips and (
            event.kind == EventKind.SPIKE or (event.kind == EventKind.DIVERGENCE and not math.isfinite(event.value))
        ):
            if not self.skips.claim(event.step):
                self.counts["skipped_batches"] += 1
            if event.kind == EventKind.DIVERGENCE:  # no rollback resets the detector: a NaN after the skips must
                self._detector_named(event.detector).rearm()  # raise a divergence again, not go unseen
            return Intent(event, Action.SKIP, reason="its update was not applied")
        response = self.responses.get(kind_name(event.kind))
        if response is None:
            return Intent(event, Action.NONE, reason="logged")
        return response(event, calm_before)

    def _lasting_non_finite(self, step: int, gated: Intent, code: int) -> list[Intent]:
        """After ``LASTING_NON_FINITE`` non-finite steps in a row, all skipped by the gate, a divergence: the
        response the detectors' divergence would get (a rollback, a cut LR, a stop once the budget is spent)."""
        if code != NON_FINITE:
            self._non_finite_streak = 0
            return []
        self._non_finite_streak = self._non_finite_streak + 1 if step == self._non_finite_step + 1 else 1
        self._non_finite_step = step
        if self._non_finite_streak < LASTING_NON_FINITE:
            return []
        self._non_finite_streak = 0
        why = f"{LASTING_NON_FINITE} non-finite steps in a row, each skipped by the update gate, are a divergence"
        began = step - LASTING_NON_FINITE + 1  # the calm before the streak: after a calm stretch, bad data
        calm_before = began - self._calm_from if self._calm_from is not None and began >= self._calm_from else 0
        intent = self._on_divergence(gated.event, calm_before)
        if intent.action == Action.NONE:
            return []
        return [replace(intent, reason=f"{why}; {intent.reason}" if intent.reason else why)]

    def _on_divergence(self, event: Event, calm_before: int) -> Intent:
        config = self.config
        if self._signal_of.get(event.detector) == GRAD_NORM:  # the gradient norm leads; the loss must confirm it
            return self._warn(event, calm_before)
        if not config.rollback or self.good is None:
            return Intent(event, Action.NONE, reason="logged")
        good = self.good
        self._restore_detectors(good)
        if self.incident_rollbacks >= config.max_rollbacks:
            self.stopped = True
            return Intent(event, Action.STOP, rollback_to=good.step)
        bad_batch = (
            config.keep_lr_on_bad_batch
            and event.sudden
            and self.incident_rollbacks == 0
            and calm_before >= config.confirm_steps
            and not self.lr_rising
        )
        self.incident_rollbacks += 1
        if not bad_batch:
            self.search.lower_ceiling(self.search.lr)
        if bad_batch:  # the data stream moves on past it: the LR was not to blame
            return self._rollback(event, good.step, config.skip_batches, factor=1.0, reason=BAD_BATCH)
        trouble = self.trouble_from
        if (
            config.warmup_cap_factor is not None
            and not self.capped
            and trouble is not None
            and (self._trouble_rising or self.lr_rising)
        ):  # the warm-up found the threshold: cap the LR just below where the trouble began
            self.capped = True
            intent = self._rollback(event, good.step, config.skip_batches, factor=1.0, reason=WARMUP_CAP)
            return replace(intent, cap_at=trouble)
        return self._rollback(event, good.step, config.skip_batches)

    def _on_oscillation(self, event: Event, calm_before: int) -> Intent:
        factor = self.config.oscillation_factor
        if factor is None:
            return Intent(event, Action.NONE, reason="logged")
        self.search.lower_ceiling(self.search.lr)
        return Intent(event, Action.LR_CUT, lr_factor=factor)

    def _on_plateau(self, event: Event, calm_before: int) -> Intent:
        factor = self.config.plateau_factor
        if factor is None:
            return Intent(event, Action.NONE, reason="logged")
        cap_at = self._warmup_plateau(event)
        if self.lr_rising and cap_at is None:
            return Intent(event, Action.HELD, reason="no LR cut while the schedule's LR is still rising (warm-up)")
        if cap_at is not None:
            mark = self._before(cap_at)
            if mark is not None:  # back to before the LR passed where the loss still falls, capped below there
                return self._back_before_plateau(event, mark, cap_at)
        if self.origin is not None:
            progress = self._progress.progress if self._progress is not None else math.nan
            early = event.detector == "plateau" and event.score < RESTART_MIN_VALUES  # the built-in: score = values
            if progress < RESTART_PROGRESS and early:
                return Intent(
                    event,
                    Action.NONE,
                    reason=f"logged: no progress yet, but a failed start needs {RESTART_MIN_VALUES} values without "
                    "improvement",
                )
            if progress < RESTART_PROGRESS:  # NaN (unknown): no restart
                return self._restart(event, progress)
        self.search.lower_ceiling(self.search.lr)
        if cap_at is not None:  # the warm-up carried the LR past where the loss still falls: cap it below there
            self.capped = True
            return Intent(event, Action.LR_CUT, lr_factor=factor, reason=WARMUP_PLATEAU, cap_at=cap_at)
        return Intent(event, Action.LR_CUT, lr_factor=factor)

    def _warmup_plateau(self, event: Event) -> int | None:
        """Where a plateau's progress stopped (its ``began``: the step of its best level), when the schedule's LR
        has risen since or is rising now and the fit has had no warm-up cap yet: the LR cut then also caps the LR
        at ``warmup_cap_factor`` times the LR of that step. ``None`` otherwise."""
        began = event.began
        if self.config.warmup_cap_factor is None or self.capped or began is None or began >= event.step:
            return None
        if not getattr(self._detector_named(event.detector), "progress_lost", False):
            return None  # a flat loss under a rising LR is not past the threshold: the LR did it no harm
        rose = self._warmup_rose_at is not None and self._warmup_rose_at > began
        return began if self.lr_rising or rose else None

    def _before(self, step: int) -> SnapshotMark | None:
        """The latest restorable snapshot at or before ``step`` (the good one, the progress mark, where training
        started), or ``None``."""
        marks = [m for m in (self.good, self.progress_mark, self.origin) if m is not None and m.step <= step]
        return max(marks, key=lambda m: m.step, default=None)

    def _back_before_plateau(self, event: Event, mark: SnapshotMark, cap_at: int) -> Intent:
        """A warm-up plateau: the steps since ``mark`` were taken at LRs past where the loss still falls and left
        the model worse than at its best (a cut LR does not undo that); roll back there, keep the LR factor and
        cap the LR at ``warmup_cap_factor`` times the LR where the progress stopped."""
        self.capped = True
        self.search.lower_ceiling(self.search.lr)
        self._restore_detectors(mark)
        self.good, self.progress_mark = mark, None  # the snapshots taken since hold the worse model
        if self.origin is not None and self.origin.step > mark.step:
            self.origin = None
        intent = self._rollback(event, mark.step, 0, factor=1.0, reason=WARMUP_PLATEAU)
        return replace(intent, cap_at=cap_at)

    def _keep_progress_mark(self) -> None:
        """Before the good snapshot is replaced by a newer one: keep it as the progress mark (one more snapshot
        held) when it is no later than where the progress detector's best level is, while a warm-up plateau may
        still roll back there (a warm-up cap is still to come, and no progress has been made since the LR last
        rose); drop the mark once none can."""
        old, best = self.good, getattr(self._progress, "best_step", None)
        may_cap = self.config.rollback and self.config.warmup_cap_factor is not None and not self.capped
        risen = self._warmup_rose_at is not None and isinstance(best, int) and best < self._warmup_rose_at
        if not may_cap or not isinstance(best, int) or not (risen or self.lr_rising):
            self.progress_mark = None
        elif old is not None and old.step <= best:
            self.progress_mark = old

    def _restart(self, event: Event, progress: float) -> Intent:
        origin = self.origin
        assert origin is not None
        self.restarts += 1
        self.search.lower_ceiling(self.search.lr)
        self._restore_detectors(origin)
        self.good = origin  # the snapshots taken since hold the broken model
        if self.restarts >= self.config.max_rollbacks:
            self.origin = None  # the last restart: later plateaus get LR cuts
        where = (
            f"is {100 * -progress:.1f}% above where training started"
            if progress < 0
            else f"has improved only {100 * progress:.1f}% on where training started"
        )
        reason = f"a failed start: the loss {where} (restart {self.restarts} of {self.config.max_rollbacks})"
        return self._rollback(event, origin.step, 0, reason=reason)

    def _rollback(
        self, event: Event, step: int, skip_batches: int, factor: float | None = None, reason: str = ""
    ) -> Intent:
        self.counts["rollbacks"] += 1
        self._calm_from = self._calm_ended = None
        self._grad_warning = None
        self.trouble_from = None
        self.skips.left = skip_batches
        factor = self.config.rollback_factor if factor is None else factor
        return Intent(event, Action.ROLLBACK, factor, step, skip_batches, reason)

    def _restore_detectors(self, mark: SnapshotMark) -> None:
        for name, detector in self.detectors.items():
            if name in mark.detectors:
                detector.load_state_dict(mark.detectors[name])
        self.pending = None

    # -- the LR search (lr_guard.lr_search) ---------------------------------------------------------------------
    def _may_search(self) -> bool:
        """Nothing in the way of a trial but the loss's own trend (which :meth:`LRSearch.proposal` reads)."""
        return (
            self.config.rollback
            and not self.stopped
            and self.good is not None
            and self.pending is None
            and self.incident_rollbacks == 0
            and self.skips.left == 0
            and not self.lr_rising
            and self.quiet()
        )

    def _search(self, step: int, loss: float) -> Intent | None:
        """A value with no event, with the search on: a trial's value (and its verdict when it is due), or one
        more value of the baseline, and a trial when the rules allow one."""
        search = self.search
        trial = search.trial
        if trial is not None:
            if trial.start is None or step < trial.start:  # a value of the weights before the trial
                trial.baseline.append((step, loss))
                trial.detectors = self.detector_state()
                return None
            if not math.isfinite(loss):  # not a divergence event: the divergence detector is off
                return self._trial_failed(step, loss, f"step {step}: loss {loss}", "the loss is not finite")
            trial.values.append((step, loss))
            if step < trial.start + search.window:
                return None
            verdict = search.verdict(trial)
            assert verdict is not None  # a window of at least 6 steps has 3 values in its second half
            return self._judged(trial, verdict, step, loss)
        if not math.isfinite(loss):
            search.history = []
            return None
        search.add(step, loss)
        if not self._may_search():
            return None
        proposal = search.proposal(step)
        if proposal is None:
            return None
        raise_factor, trend = proposal
        search.trial = Trial(raise_factor, search.lr, trend, list(search.history), self.detector_state())
        self.counts["lr_trials"] = self.counts.get("lr_trials", 0) + 1
        ceiling = f"; ceiling {search.ceiling:.3g}" if math.isfinite(search.ceiling) else ""
        scale = "of log-loss against log-step" if trend.log_loss else "against log-step"
        event = Event(
            LR_SEARCH,
            step,
            loss,
            trend.slope_t,
            -Z,
            LR_SEARCH,
            f"step {step}: the loss falls steadily and quietly (slope {trend.slope:.3g} {scale} over the last "
            f"{trend.n} steps, {trend.slope_t:.1f} standard errors{ceiling})",
        )
        return Intent(
            event, Action.LR_TRIAL, lr_factor=raise_factor, reason=f"trying a higher LR for {search.window} steps"
        )

    def begin_sweep(self, step: int, lrs: list[float], peak: float, stop: Detector, peak_from: str) -> Intent:
        """Start the in-run range test from the snapshot of ``step`` (the state training starts from): step
        ``step + k`` runs at ``lrs[k]``; ``peak``: the schedule's peak LR (``peak_from`` says how it was found);
        ``stop``: the divergence rule that ends it early."""
        assert self.good is not None and self.good.step == step, "the sweep starts from the starting snapshot"
        stop.reset()
        self.search.sweep = Sweep(step, lrs, peak, stop)
        self.counts["lr_sweeps"] = self.counts.get("lr_sweeps", 0) + 1
        event = Event(
            LR_SEARCH,
            step,
            math.nan,
            math.nan,
            math.nan,
            LR_SEARCH,
            f"step {step}: an LR range test inside the run, from the state training starts from: {len(lrs)} steps "
            f"from lr {lrs[0]:.3g} to {lrs[-1]:.3g} ({SWEEP_LOW:g} to {SWEEP_HIGH:g} x the schedule's peak "
            f"{peak:.3g}, {peak_from})",
        )
        return Intent(event, Action.LR_SWEEP, reason="then back to this state, with the peak placed by what it reads")

    def _swept(self, step: int, values: float | Mapping[str, float]) -> list[Intent]:
        """A value of the sweep's steps; at its end (all steps seen, or stopped), what the range test reads."""
        sweep = self.search.sweep
        assert sweep is not None
        loss = float(values.get(LOSS, math.nan)) if isinstance(values, Mapping) else float(values)
        if not sweep.add(step, loss):
            return []
        return [self._sweep_read(step, loss)]

    def _sweep_read(self, step: int, loss: float) -> Intent:
        """Read the sweep: back to where it started, the LR factor set to place the schedule's peak
        (:func:`~lr_guard.lr_search.placed_peak`); the threshold is the ceiling from now on, and with one found no
        trials follow."""
        search = self.search
        sweep = search.sweep
        assert sweep is not None and self.good is not None
        search.sweep, search.swept = None, True
        result = sweep.read()
        self._restore_detectors(self.good)  # the starting snapshot, as good as ever
        search.history = []
        search.placed = result.threshold is not None  # the trials are the net of a sweep that read nothing
        if result.threshold is not None:
            search.lower_ceiling(result.threshold)
        peak, why = placed_peak(sweep.peak, result)
        steepest = f", steepest descent at {result.steepest:.3g}" if result.steepest is not None else ""
        found = f"threshold {result.threshold:.3g}" if result.threshold is not None else "no threshold"
        message = f"step {step}: the LR range test saw {len(sweep.losses)} steps: {found}{steepest} ({result.reason})"
        reason = f"the schedule's peak {sweep.peak:.3g} is {why}"
        reason += "; no LR trials from now on" if search.placed else "; LR trials from now on, as the net"
        factor = peak / sweep.peak
        event = Event(LR_SEARCH, step, loss, result.threshold or math.nan, math.nan, LR_SEARCH, message)
        return Intent(event, Action.ROLLBACK, factor, sweep.start, 0, reason, from_snapshot=True)

    def _judged(self, trial: Trial, verdict: Verdict, step: int, loss: float) -> Intent:
        score = verdict.gain / verdict.se if verdict.se > 0 else -math.inf if verdict.gain < 0 else math.inf
        where = "below" if verdict.gain < 0 else "above"
        size = f"{100 * math.expm1(abs(verdict.gain)):.3g}%" if trial.trend.log_loss else f"{abs(verdict.gain):.3g}"
        message = (
            f"step {step}: over the last {verdict.n} steps at lr {trial.lr:.3g} the loss is {size} "
            f"{where} the trend before the trial ({score:.1f} standard errors; below {-Z:g} keeps the raise)"
        )
        if not verdict.keep:
            return self._trial_failed(step, loss, message, "the loss fell no faster than before", score)
        self.search.kept(step)
        self.counts["lr_raises_kept"] = self.counts.get("lr_raises_kept", 0) + 1
        event = Event(LR_SEARCH, step, loss, score, -Z, LR_SEARCH, message)
        return Intent(event, Action.LR_KEEP, reason=f"the loss falls faster at lr {trial.lr:.3g}")

    def _trial_failed(self, step: int, loss: float, message: str, why: str, score: float = math.nan) -> Intent:
        """Back to the trial's snapshot with the LR factor it had; the trial's LR is the ceiling from now on."""
        trial = self.search.trial
        assert trial is not None and trial.start is not None
        start = trial.start
        self._back_to_trial_start(trial)
        self.search.failed(start)
        self.counts["lr_trials_rolled_back"] = self.counts.get("lr_trials_rolled_back", 0) + 1
        event = Event(LR_SEARCH, step, loss, score, -Z, LR_SEARCH, message)
        reason = f"the LR trial failed: {why}; no trial at lr {trial.lr:.3g} or above from now on"
        return Intent(event, Action.ROLLBACK, 1.0 / trial.raise_factor, start, 0, reason)

    def _back_to_trial_start(self, trial: Trial) -> None:
        """The detectors as they were at the trial's snapshot, which is the good one now (a restore frees the
        others)."""
        assert trial.start is not None
        mark = SnapshotMark(trial.start, trial.detectors)
        self._restore_detectors(mark)
        self.good = mark
        self.origin = None  # the loss was falling steadily before the trial: no failed start to restart

    def _trial_undone(self, event: Event) -> Intent:
        """An event on a step before the trial's snapshot (its value arrived after the trial began): the raise is
        taken back without a restore, and the event gets its own response."""
        trial = self.search.trial
        assert trial is not None
        self.search.abandoned(event.step)
        self.search.history = []
        note = Event(
            LR_SEARCH,
            event.step,
            event.value,
            math.nan,
            math.nan,
            LR_SEARCH,
            f"step {event.step}: {kind_name(event.kind)} on a step before the LR trial (of step {trial.start})",
        )
        return Intent(note, Action.LR_UNDO, 1.0 / trial.raise_factor, reason="the trial's raise is taken back")

    def trial_started(self, step: int) -> None:
        """The trial asked for has begun: the snapshot of ``step`` was taken and the LR raised."""
        trial = self.search.trial
        if trial is not None:
            trial.start = step

    def trial_steps_discarded(self, steps: int) -> None:
        """A trial's rollback threw away ``steps`` optimizer steps."""
        self.counts["discarded_trial_steps"] = self.counts.get("discarded_trial_steps", 0) + steps

    def end_trial(self) -> Intent | None:
        """A checkpoint is about to be written during a trial: judge it now on the values of its second half, or
        with fewer than 3 of them roll back to its snapshot (no ceiling), so that a checkpoint never holds a
        trial's state; ``None`` when no trial is under way."""
        sweep = self.search.sweep
        if sweep is not None:  # read on the steps it has seen
            return self._sweep_read(sweep.start + len(sweep.losses) - 1, sweep.losses[-1] if sweep.losses else math.nan)
        trial = self.search.trial
        if trial is None or trial.start is None:
            return None
        step, loss = trial.values[-1] if trial.values else (trial.start, math.nan)
        verdict = self.search.verdict(trial)
        if verdict is not None:
            return self._judged(trial, verdict, step, loss)
        start = trial.start
        self._back_to_trial_start(trial)
        self.search.abandoned(start)
        event = Event(
            LR_SEARCH,
            step,
            loss,
            math.nan,
            math.nan,
            LR_SEARCH,
            f"step {step}: a checkpoint is written before the LR trial of step {start} can be judged",
        )
        reason = "the checkpoint holds the state before the trial; the search tries again later"
        return Intent(event, Action.ROLLBACK, 1.0 / trial.raise_factor, start, 0, reason)

    # -- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "detectors": self.detector_state(),
            "counts": dict(self.counts),
            "incident_rollbacks": self.incident_rollbacks,
            "restarts": self.restarts,
            "capped": self.capped,
            "skip_left": self.skips.left,
            "stopped": self.stopped,  # written by the guard's stop: a resume from it gets a fresh budget
            "lr_search": self.search.state_dict(),
            "non_finite_streak": [self._non_finite_streak, self._non_finite_step],
        }

    def load_state_dict(self, state: dict[str, Any], warn: Callable[[str], None] | None = None) -> None:
        load_detector_states(self.detectors, state.get("detectors", {}), warn)
        self.counts.update({k: int(v) for k, v in state.get("counts", {}).items() if k in self.counts})
        # a checkpoint the guard wrote as it stopped: whoever resumes from it has chosen to go on, with a fresh
        # budget of rollbacks (the spent one would stop the run again at its first bad batch)
        self.incident_rollbacks = 0 if state.get("stopped") else int(state.get("incident_rollbacks", 0))
        self.restarts = int(state.get("restarts", 0))
        self.capped = bool(state.get("capped", False))
        self.skips.left = int(state.get("skip_left", 0))
        self.search.load_state_dict(state.get("lr_search", {}))
        streak, last = state.get("non_finite_streak", (0, -2))  # a streak a resume continues, not restarts
        self._non_finite_streak, self._non_finite_step = int(streak), int(last)


def load_detector_states(
    detectors: Mapping[str, Detector], saved: Mapping[str, Any], warn: Callable[[str], None] | None = None
) -> None:
    """Load each saved detector state into the detector of its slot; a state written by another class is
    skipped (with a warning: the detector stays fresh), as is a slot that is not there any more."""
    for name, state in saved.items():
        detector = detectors.get(name)
        if detector is None or not detector.STATE_VERSION:
            continue
        if state.get("detector") != type(detector).__name__:
            if warn is not None:
                warn(
                    f"checkpoint holds {state.get('detector')} state for {name!r}; keeping a fresh "
                    f"{type(detector).__name__}"
                )
            continue
        detector.load_state_dict(copy.deepcopy(state))
