"""What the guard does about what it sees: the decisions, without the training state (pure Python).

``GuardPolicy`` feeds the detectors, keeps track of which snapshot is the last good one, and turns every event
into an :class:`Intent`: roll back to step N with the LR times f, cut the LR, skip, stop, hold or just log. The
Lightning callbacks carry the intents out on a live training run; ``lr-guard replay`` carries them out on paper
over a finished run's log. One set of rules serves both, so a replay says what the guard would really have done.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

from lr_guard.detectors import Detector, NullDetector
from lr_guard.events import Action, Event, EventKind

__all__ = ["GuardPolicy", "Intent", "SnapshotMark"]

# A plateau before the loss has got this much (relative) below where training started is a failed start
RESTART_PROGRESS = 0.05

# Why a first rollback keeps the LR: one value blew up after a calm stretch, outside a warm-up
BAD_BATCH = "LR factor kept: a sudden blow-up after a calm stretch is a bad batch, not a too-high LR"

COUNTS = ("spike", "oscillation", "plateau", "divergence", "lr_cuts", "rollbacks", "skipped_batches", "snapshots")


@dataclass(frozen=True)
class Intent:
    """What the policy wants done about one event."""

    event: Event
    action: Action
    lr_factor: float = 1.0  # multiply the LR by this (cuts and rollbacks)
    rollback_to: int | None = None  # the snapshot step to restore (rollback and stop)
    skip_batches: int = 0
    reason: str = ""  # why an action was held or only logged


@dataclass
class SnapshotMark:
    """A snapshot's step and the detectors' state at that moment (the training state itself is the caller's)."""

    step: int
    detectors: dict[str, Any]


class GuardPolicy:
    """The guard's rules.

    * A snapshot is wanted every ``snapshot_every`` steps while every detector is quiet and none is pending; it
      becomes the good one after ``confirm_steps`` healthy values (finite, no spike or divergence, detectors
      quiet); an unhealthy value discards it.
    * Divergence: roll back to the good snapshot with the LR times ``rollback_factor`` and ``skip_batches``
      skipped; after ``max_rollbacks`` rollbacks with no newly confirmed snapshot, stop (restoring it first).
      The detectors are put back to their state at the snapshot. A bad batch keeps the LR
      (``keep_lr_on_bad_batch``): when the first rollback of an incident is set off by one sudden value (non-finite
      or blown up) after at least ``confirm_steps`` values without any event, outside a warm-up, the LR was not
      to blame, and the data stream has moved past the batch; if the trouble comes back, the next rollback cuts.
    * Plateau / oscillation: cut the LR by ``plateau_factor`` / ``oscillation_factor``, or log only when that is
      ``None``; a plateau cut is held while the schedule's LR is rising (``lr_rising``).
    * A failed start: a plateau while the plateau detector's best mean is less than ``RESTART_PROGRESS`` (5%)
      better than the first value -- training has learned nothing, typically because a too-high LR broke the
      model in its first steps (dead ReLUs), which no LR cut can undo. Restart from the state training started
      from (``origin``, kept until the loss makes that progress) with the LR times ``rollback_factor``; at most
      ``max_rollbacks`` times, after which plateaus get ordinary LR cuts. Nothing is lost by the restart: the
      discarded steps had made no progress.
    * Spike: logged. A step whose update was skipped before it was applied (``skipped_updates``) is reported as
      skipped, and a non-finite value there needs no rollback.
    """

    def __init__(
        self,
        detectors: dict[str, Detector],
        *,
        plateau_factor: float | None,
        oscillation_factor: float | None,
        rollback: bool,
        rollback_factor: float,
        skip_batches: int,
        max_rollbacks: int,
        snapshot_every: int,
        confirm_steps: int,
        keep_lr_on_bad_batch: bool = True,
    ) -> None:
        self.detectors = detectors
        self.plateau_factor = plateau_factor
        self.oscillation_factor = oscillation_factor
        self.rollback = rollback
        self.rollback_factor = rollback_factor
        self.skip_batches = skip_batches
        self.max_rollbacks = max_rollbacks
        self.snapshot_every = snapshot_every
        self.confirm_steps = confirm_steps
        self.keep_lr_on_bad_batch = keep_lr_on_bad_batch
        self.counts = dict.fromkeys(COUNTS, 0)
        self._active = [d for d in detectors.values() if not isinstance(d, NullDetector)]
        self.incident_rollbacks = 0
        self.restarts = 0  # failed starts restarted (kept across a resume, like the counters)
        self.reset_run()

    def refresh(self) -> None:
        """Pick up detectors replaced in ``self.detectors`` (the dict is shared with the callback)."""
        self._active = [d for d in self.detectors.values() if not isinstance(d, NullDetector)]

    def reset_run(self) -> None:
        """Forget the snapshots and per-run flags (the counters and detectors stay)."""
        self.good: SnapshotMark | None = None
        self.pending: SnapshotMark | None = None
        self.origin: SnapshotMark | None = None  # where training started, kept for a restart until progress
        self.healthy_after_pending = 0
        # steps whose update was not applied -> whether the caller counted the skip already
        self.skipped_updates: dict[int, bool] = {}
        self.lr_rising = False  # the schedule's LR is rising (a warm-up): see note_lr
        self._last_lr: float | None = None
        self._last_lr_step: int | None = None
        self.stopped = False
        self.calm_steps = 0  # values in a row that raised no event

    def note_lr(self, lr: float, step: int) -> None:
        """The schedule's own LR (without the guard's cuts) at ``step``; higher than at the last step noted means
        a warm-up is under way (``lr_rising``). A second note at the same step changes nothing: the schedule has
        not moved since the first."""
        if step == self._last_lr_step:
            return
        last = self._last_lr
        self.lr_rising = last is not None and lr > last * (1 + 1e-9)
        self._last_lr, self._last_lr_step = lr, step

    # -- snapshots -------------------------------------------------------------------------------------------------
    def quiet(self) -> bool:
        """Nothing is building up: the moment to take, or confirm, a snapshot of a good state."""
        return all(d.quiet for d in self._active)

    def detector_state(self) -> dict[str, Any]:
        return {name: d.state_dict() for name, d in self.detectors.items()}

    def start(self, step: int) -> None:
        """Training starts (or resumes) at ``step``: its state is good by definition."""
        self.good = SnapshotMark(step, self.detector_state()) if self.rollback else None
        plateau = self.detectors.get("plateau")
        watches_progress = plateau is not None and not isinstance(plateau, NullDetector)
        self.origin = self.good if watches_progress and self.restarts < self.max_rollbacks else None

    def kept_steps(self) -> set[int]:
        """The steps whose snapshots the rules may still restore."""
        return {mark.step for mark in (self.good, self.pending, self.origin) if mark is not None}

    def wants_snapshot(self, step: int) -> bool:
        return (
            self.rollback
            and not self.stopped
            and self.pending is None
            and step % self.snapshot_every == 0
            and self.quiet()
        )

    def snapshot_taken(self, step: int) -> None:
        self.pending = SnapshotMark(step, self.detector_state())
        self.healthy_after_pending = 0
        self.counts["snapshots"] += 1

    def _confirm(self, step: int, healthy: bool) -> None:
        if self.pending is None or step < self.pending.step:
            return
        if not healthy:
            self.pending = None
            return
        self.healthy_after_pending += 1
        if self.healthy_after_pending >= self.confirm_steps:
            self.good, self.pending = self.pending, None
            self.incident_rollbacks = 0

    # -- decisions -------------------------------------------------------------------------------------------------
    def observe(self, step: int, value: float) -> list[Intent]:
        """Feed one value; return what should be done, in order (a rollback or stop ends the list)."""
        if self.stopped:
            return []
        events = None
        for detector in self._active:
            event = detector.update(value, step)
            if event is not None:
                events = [event] if events is None else [*events, event]
        if self.pending is not None:
            healthy = (
                math.isfinite(value)
                and self.quiet()
                and not (events and any(e.kind in (EventKind.SPIKE, EventKind.DIVERGENCE) for e in events))
            )
            self._confirm(step, healthy)
        if self.skipped_updates:
            self.skipped_updates = {s: c for s, c in self.skipped_updates.items() if s >= step}
        if self.origin is not None and getattr(self.detectors["plateau"], "progress", 0.0) >= RESTART_PROGRESS:
            self.origin = None  # training got going: no restart from scratch any more
        if not events:
            self.calm_steps += 1
            return []
        calm_before, self.calm_steps = self.calm_steps, 0
        intents = []
        for event in sorted(events, key=lambda e: e.kind != EventKind.DIVERGENCE):
            self.counts[event.kind.value] += 1
            intent = self._decide(event, calm_before)
            intents.append(intent)
            if intent.action in (Action.ROLLBACK, Action.STOP) or (
                intent.action == Action.SKIP and event.kind == EventKind.DIVERGENCE
            ):
                break
        self.skipped_updates.pop(step, None)
        return intents

    def _decide(self, event: Event, calm_before: int) -> Intent:
        if event.step in self.skipped_updates and (
            event.kind == EventKind.SPIKE or (event.kind == EventKind.DIVERGENCE and not math.isfinite(event.value))
        ):
            if not self.skipped_updates.pop(event.step):
                self.counts["skipped_batches"] += 1
            return Intent(event, Action.SKIP, reason="its update was not applied")
        if event.kind == EventKind.DIVERGENCE and self.rollback and self.good is not None:
            good = self.good
            self._restore_detectors(good)
            if self.incident_rollbacks >= self.max_rollbacks:
                self.stopped = True
                return Intent(event, Action.STOP, rollback_to=good.step)
            bad_batch = (
                self.keep_lr_on_bad_batch
                and event.sudden
                and self.incident_rollbacks == 0
                and calm_before >= self.confirm_steps
                and not self.lr_rising
            )
            self.incident_rollbacks += 1
            if bad_batch:  # the data stream moves on past it: the LR was not to blame
                return self._rollback(event, good.step, self.skip_batches, factor=1.0, reason=BAD_BATCH)
            return self._rollback(event, good.step, self.skip_batches)
        factor = {EventKind.PLATEAU: self.plateau_factor, EventKind.OSCILLATION: self.oscillation_factor}.get(
            event.kind
        )
        if factor is None:
            return Intent(event, Action.NONE, reason="logged")
        if event.kind == EventKind.PLATEAU and self.lr_rising:
            return Intent(event, Action.HELD, reason="no LR cut while the schedule's LR is still rising (warm-up)")
        if event.kind == EventKind.PLATEAU and self.origin is not None:
            progress = getattr(self.detectors["plateau"], "progress", math.nan)
            if progress < RESTART_PROGRESS:  # NaN (unknown): no restart
                return self._restart(event, progress)
        return Intent(event, Action.LR_CUT, lr_factor=factor)

    def _restart(self, event: Event, progress: float) -> Intent:
        origin = self.origin
        assert origin is not None
        self.restarts += 1
        self._restore_detectors(origin)
        self.good = origin  # the snapshots taken since hold the broken model
        if self.restarts >= self.max_rollbacks:
            self.origin = None  # the last restart: later plateaus get LR cuts
        reason = (
            f"a failed start: the loss has improved only {100 * progress:.1f}% on where training started "
            f"(restart {self.restarts} of {self.max_rollbacks})"
        )
        return self._rollback(event, origin.step, 0, reason=reason)

    def _rollback(
        self, event: Event, step: int, skip_batches: int, factor: float | None = None, reason: str = ""
    ) -> Intent:
        self.counts["rollbacks"] += 1
        self.calm_steps = 0
        factor = self.rollback_factor if factor is None else factor
        return Intent(event, Action.ROLLBACK, factor, step, skip_batches, reason)

    def _restore_detectors(self, mark: SnapshotMark) -> None:
        for name, detector in self.detectors.items():
            if name in mark.detectors:
                detector.load_state_dict(mark.detectors[name])
        self.pending = None

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "detectors": self.detector_state(),
            "counts": dict(self.counts),
            "incident_rollbacks": self.incident_rollbacks,
            "restarts": self.restarts,
        }

    def load_state_dict(self, state: dict[str, Any], warn: Any = None) -> None:
        for name, saved in state.get("detectors", {}).items():
            detector = self.detectors.get(name)
            if detector is None or not detector.STATE_VERSION:
                continue
            if saved.get("detector") != type(detector).__name__:
                if warn is not None:
                    warn(
                        f"checkpoint holds {saved.get('detector')} state for {name!r}; keeping a fresh "
                        f"{type(detector).__name__}"
                    )
                continue
            detector.load_state_dict(copy.deepcopy(saved))
        self.counts.update({k: int(v) for k, v in state.get("counts", {}).items() if k in self.counts})
        self.incident_rollbacks = int(state.get("incident_rollbacks", 0))
        self.restarts = int(state.get("restarts", 0))


def describe(
    intent: Intent, lr_before: float, lr_after: float, max_rollbacks: int, incident: int, checkpoint: str | None = None
) -> str:
    """The sentence logged for an executed intent."""
    event = intent.event
    if intent.action == Action.ROLLBACK and event.kind == EventKind.PLATEAU:  # a failed start: a restart
        return (
            f"{event.message} -- {intent.reason}: restarted from step {intent.rollback_to}, "
            f"lr {lr_before:.3g} -> {lr_after:.3g}"
        )
    if intent.action == Action.ROLLBACK:
        skip = f", skipping the next {intent.skip_batches} batches" if intent.skip_batches else ""
        return (
            f"{event.message} -- rolled back to step {intent.rollback_to}, lr {lr_before:.3g} -> {lr_after:.3g}"
            f"{skip} (rollback {incident} of {max_rollbacks}{'; ' + intent.reason if intent.reason else ''})"
        )
    if intent.action == Action.STOP:
        where = (
            f" The last good state (step {intent.rollback_to}) is saved at {checkpoint}; resume with "
            f"Trainer.fit(model, ckpt_path={checkpoint!r}) after changing what made it diverge"
            if checkpoint
            else f" The last good state is that of step {intent.rollback_to}."
        )
        return f"{event.message} -- still diverging after {incident} rollback(s); training stopped.{where}"
    if intent.action == Action.LR_CUT:
        return f"{event.message} -- lr {lr_before:.3g} -> {lr_after:.3g} (x{intent.lr_factor:g})"
    return f"{event.message} -- {intent.reason}"
