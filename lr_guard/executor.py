"""Carrying out the policy's intents, on a live run or on paper -- one table maps each action to what is done and
how it reads.

:class:`IntentExecutor` takes an :class:`~lr_guard.policy.Intent` and a :class:`RunState` -- the training run it
acts on: the live Trainer (``lr_guard.callbacks.live_run``) or a replay's paper run (``lr_guard.replay``) -- and
returns the :class:`~lr_guard.events.Decision` it made. The LR is changed through :mod:`lr_guard.actions.lr` (every
LR change the guard makes goes through it), on whatever ``param_groups`` the run has, so ``min_lr`` and ``eps``
hold offline too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from lr_guard.actions.lr import cut_lr, lr_caps, lr_factors, set_lr_caps, set_lr_factors, set_min_lr
from lr_guard.config import GuardConfig, per_group_floors
from lr_guard.events import Action, Decision, EventKind
from lr_guard.lr_search import LR_SEARCH
from lr_guard.policy import GuardPolicy, Intent

__all__ = ["ACTIONS", "ActionSpec", "IntentExecutor", "RunState"]

NO_CUT = "no LR cut: every group is at min_lr or the change is below eps"


class RunState(Protocol):
    """What intents act on: a training run's optimizers (anything with ``param_groups``), its current step, and
    the means to restore a snapshot's step and to stop."""

    @property
    def optimizers(self) -> Sequence[Any]: ...

    @property
    def step(self) -> int: ...

    def restore(self, step: int) -> None:
        """Put the training state of the snapshot at ``step`` back; forget values read since."""

    def stop(self, step: int) -> str | None:
        """Stop training with the state of ``step`` restored; the path of the checkpoint written, if any."""

    def locate(self, step: int) -> tuple[int, int] | None:
        """The epoch and batch index of step ``step``, where known."""

    def take_snapshot(self) -> int:
        """Snapshot the training state now (an LR trial's); the step it holds."""

    def lrs_at(self, step: int) -> list[list[float]] | None:
        """The LR of every param group of every optimizer at step ``step`` (what it stepped with), where known."""


@dataclass(frozen=True)
class _Context:
    """What a message may say about an executed intent."""

    lr_before: float
    lr_after: float
    max_rollbacks: int
    incident: int
    checkpoint: str | None
    step: int  # the step at which the guard acted
    dry_run: bool = False  # nothing was done: the message says what would have been
    cap: _Cap | None = None  # the cap a rollback set


@dataclass(frozen=True)
class _Cap:
    """The LR cap a rollback set: the first group's cap, and its LR at the step the trouble began."""

    lr: float
    trouble_lr: float
    trouble_step: int


def _lr_change(intent: Intent, c: _Context) -> tuple[str, str]:
    """How a rollback's LR change reads: ``lr a -> b``, or ``lr a kept``; and why, where the change is not the
    factor alone (the restored schedule's LR differs from the current one)."""
    before, after = f"{c.lr_before:.3g}", f"{c.lr_after:.3g}"
    if before == after and intent.lr_factor == 1.0:
        return f"lr {before} kept", ""
    change = f"lr {before} -> {after}"
    if c.lr_after > c.lr_before * (1 + 1e-9):
        return change, f"the LR rises: the schedule's LR at step {intent.rollback_to} is higher than at step {c.step}"
    if before == after:
        return (
            change,
            f"the schedule's LR at step {intent.rollback_to} is higher, which offsets the x{intent.lr_factor:g}",
        )
    return change, ""


def _rollback_message(intent: Intent, c: _Context) -> str:
    event = intent.event
    change, why = _lr_change(intent, c)
    verb = "would roll back" if c.dry_run else "rolled back"
    if event.kind == LR_SEARCH:  # the LR search's trial undone
        discarded = f", discarding {c.step - intent.rollback_to} steps" if intent.rollback_to is not None else ""
        return f"{event.message} -- {verb} to step {intent.rollback_to}{discarded}, {change} ({intent.reason})"
    cap = c.cap
    if event.kind == EventKind.PLATEAU and cap is not None:  # a warm-up plateau: back to before its best level
        capped = "would cap" if c.dry_run else "capped"
        return (
            f"{event.message} -- {verb} to step {intent.rollback_to}, before the best level, {change}, {capped} the "
            f"peak at {cap.lr:.3g} (progress stopped at LR {cap.trouble_lr:.3g}, step {cap.trouble_step}: "
            f"{intent.reason})"
        )
    if event.kind == EventKind.PLATEAU:  # a failed start: a rollback to where training started
        notes = "; ".join(note for note in (intent.reason, why) if note)
        return f"{event.message} -- {verb} to step {intent.rollback_to}, where training started, {change} ({notes})"
    skip = f", skipping the next {intent.skip_batches} batches" if intent.skip_batches else ""
    if cap is not None:
        capped = "would cap" if c.dry_run else "capped"
        skip += (
            f", {capped} the peak at {cap.lr:.3g} (trouble began at LR {cap.trouble_lr:.3g}, step {cap.trouble_step})"
        )
    notes = "; ".join(note for note in (f"rollback {c.incident} of {c.max_rollbacks}", why, intent.reason) if note)
    return f"{event.message} -- {verb} to step {intent.rollback_to}, {change}{skip} ({notes})"


def _stop_message(intent: Intent, c: _Context) -> str:
    if c.dry_run:
        return (
            f"{intent.event.message} -- still diverging after {c.incident} rollback(s): would stop training with the "
            f"state of step {intent.rollback_to} restored (dry run: the guard watches no further)"
        )
    where = (
        f" The last good state (step {intent.rollback_to}) is saved at {c.checkpoint}; resume with "
        f"Trainer.fit(model, ckpt_path={c.checkpoint!r}) after changing what made it diverge"
        if c.checkpoint
        else f" The last good state is that of step {intent.rollback_to}."
    )
    return f"{intent.event.message} -- still diverging after {c.incident} rollback(s); training stopped.{where}"


def _cut_message(intent: Intent, c: _Context) -> str:
    would = "would cut the LR: " if c.dry_run else ""
    text = f"{intent.event.message} -- {would}lr {c.lr_before:.3g} -> {c.lr_after:.3g} (x{intent.lr_factor:g})"
    cap = c.cap
    if cap is not None:
        capped = "would cap" if c.dry_run else "capped"
        text += (
            f", {capped} the peak at {cap.lr:.3g} (progress stopped at LR {cap.trouble_lr:.3g}, step "
            f"{cap.trouble_step}: {intent.reason})"
        )
    return text


def _reason_message(intent: Intent, c: _Context) -> str:
    return f"{intent.event.message} -- {intent.reason}"


def _skip_message(intent: Intent, c: _Context) -> str:
    if c.dry_run:
        return f"{intent.event.message} -- would skip its update (dry run: it was applied)"
    return _reason_message(intent, c)


def _trial_message(intent: Intent, c: _Context) -> str:
    return (
        f"{intent.event.message} -- {intent.reason}: lr {c.lr_before:.3g} -> {c.lr_after:.3g} "
        f"(x{intent.lr_factor:.3g}), from a snapshot of step {c.step}"
    )


def _lr_search_message(intent: Intent, c: _Context) -> str:
    return f"{intent.event.message} -- {intent.reason}; lr {c.lr_before:.3g} -> {c.lr_after:.3g}"


def _rollback_detail(decision: Decision, factor: float) -> str:
    detail = f"back to step {decision.rollback_to}, LR x{decision.lr_factor:g} (cumulative x{factor:.3g})"
    if decision.lr_cap is not None:
        detail += f", LR capped at {decision.lr_cap:.3g}"
    return detail + (f", skip {decision.skip_batches} batches" if decision.skip_batches else "")


def _rollback_done(decision: Decision) -> str:
    skip = f", skipping the next {decision.skip_batches} batches" if decision.skip_batches else ""
    cap = f" and capped the peak LR at {decision.lr_cap:.3g}" if decision.lr_cap is not None else ""
    return f"rolled back to step {decision.rollback_to}{cap}{skip}"


def _stop_done(decision: Decision) -> str:
    if not decision.checkpoint:
        return "stopped training"
    return f"stopped training; last good state (step {decision.rollback_to}) saved at `{decision.checkpoint}`"


@dataclass(frozen=True)
class ActionSpec:
    """One action: what is done (a method of :class:`IntentExecutor`), the sentence logged, what was done in
    the decision log's table, and the short detail of a replay's table (given the cumulative LR factor)."""

    handler: str
    message: Callable[[Intent, _Context], str]
    done_text: Callable[[Decision], str]
    detail: Callable[[Decision, float], str]


ACTIONS: dict[Action, ActionSpec] = {
    Action.ROLLBACK: ActionSpec("_rollback", _rollback_message, _rollback_done, _rollback_detail),
    Action.STOP: ActionSpec(
        "_stop", _stop_message, _stop_done, lambda d, f: f"stop; checkpoint of step {d.rollback_to}"
    ),
    Action.LR_CUT: ActionSpec(
        "_cut",
        _cut_message,
        lambda d: "cut the LR" + (f" and capped the peak LR at {d.lr_cap:.3g}" if d.lr_cap is not None else ""),
        lambda d, f: (
            f"LR x{d.lr_factor:g} (cumulative x{f:.3g})"
            + (f", LR capped at {d.lr_cap:.3g}" if d.lr_cap is not None else "")
        ),
    ),
    Action.SKIP: ActionSpec("_nothing", _skip_message, lambda d: "skipped the update", lambda d, f: d.reason),
    Action.CLIP: ActionSpec("_nothing", _reason_message, lambda d: "scaled the update down", lambda d, f: d.reason),
    Action.HELD: ActionSpec("_nothing", _reason_message, lambda d: "held back", lambda d, f: d.reason),
    Action.LR_TRIAL: ActionSpec(
        "_trial", _trial_message, lambda d: "started an LR trial", lambda d, f: f"LR trial x{d.lr_factor:.3g}"
    ),
    Action.LR_KEEP: ActionSpec("_nothing", _reason_message, lambda d: "kept the LR trial's raise", lambda d, f: ""),
    Action.LR_UNDO: ActionSpec(
        "_scale", _lr_search_message, lambda d: "took the LR trial's raise back", lambda d, f: d.reason
    ),
    Action.LR_SWEEP: ActionSpec("_nothing", _reason_message, lambda d: "began an LR range test", lambda d, f: ""),
    Action.NONE: ActionSpec("_nothing", _reason_message, lambda d: "logged it", lambda d, f: d.reason),
}


class IntentExecutor:
    """Carries out a policy's intents on a :class:`RunState`, and tells the policy what came of them."""

    def __init__(self, policy: GuardPolicy, config: GuardConfig) -> None:
        self.policy = policy
        self.config = config
        # a dry run's LR factors and caps, as the live guard's would be
        self._dry_factors: tuple[list[list[float]], list[list[float]]] | None = None

    def prepare(self, optimizers: Sequence[Any]) -> None:
        """Record ``min_lr`` in the optimizers' param groups (one value, or one per group of all optimizers)."""
        floors = per_group_floors(self.config.min_lr, [len(opt.param_groups) for opt in optimizers])
        for optimizer, floor in zip(optimizers, floors, strict=True):
            set_min_lr(optimizer, floor)
        self._dry_factors = None

    def process(
        self,
        values: Iterable[tuple[int, Any]],
        run: RunState,
        report: Callable[[Decision], None],
        after_value: Callable[[int, Any], None] | None = None,
    ) -> None:
        """Feed ``(step, value)`` pairs, oldest first, to the policy and carry out what it asks, handing each
        decision to ``report`` and each value to ``after_value`` once it is dealt with. Ends at a rollback or a
        stop: the values after it describe weights that are gone."""
        observe = self.policy.observe
        for step, value in values:
            rolled_back = False
            for intent in observe(step, value):
                report(self.execute(intent, run))
                rolled_back = rolled_back or intent.action == Action.ROLLBACK
            if after_value is not None:
                after_value(step, value)
            if (rolled_back and not self.config.dry_run) or self.policy.stopped:
                return  # a dry run's weights are not gone: its values go on being watched

    def execute(self, intent: Intent, run: RunState) -> Decision:
        dry_run = self.config.dry_run
        checkpoint = None
        cap = None
        if intent.cap_at is not None:
            cap = self._cap(intent.cap_at, run)
        if dry_run:
            intent, lr_before, lr_after = self._as_if(intent, run, cap)
        else:
            lr_before = _first_lr(run.optimizers)
            intent, checkpoint = getattr(self, ACTIONS[intent.action].handler)(intent, run)
            if cap is not None:
                set_lr_caps(run.optimizers, cap[0])
            lr_after = _first_lr(run.optimizers)
            if intent.event.kind == LR_SEARCH and intent.rollback_to is not None:
                self.policy.trial_steps_discarded(run.step - intent.rollback_to)
        shown = (
            _Cap(cap[0][0][0], cap[1][0][0], intent.cap_at) if cap is not None and intent.cap_at is not None else None
        )
        spec = ACTIONS[intent.action]  # a cut that could not be made is held
        context = _Context(
            lr_before,
            lr_after,
            self.config.max_rollbacks,
            self.policy.incident_rollbacks,
            checkpoint,
            run.step,
            dry_run,
            shown,
        )
        where = run.locate(intent.event.step)
        return Decision(
            intent.event,
            intent.action,
            run.step,
            lr_before,
            lr_after,
            intent.rollback_to,
            intent.skip_batches,
            checkpoint,
            spec.message(intent, context),
            intent.lr_factor,
            intent.reason,
            where[0] if where else None,
            where[1] if where else None,
            dry_run,
            shown.lr if shown else None,
            shown.trouble_lr if shown else None,
            shown.trouble_step if shown else None,
        )

    def _cap(self, step: int, run: RunState) -> tuple[list[list[float]], list[list[float]]]:
        """The caps a rollback sets (``warmup_cap_factor`` times each group's LR at ``step``, where the trouble
        began; the LR now where that step's is not known), each no higher than a cap the group already has, and
        the LRs they were read from."""
        assert self.config.warmup_cap_factor is not None
        lrs = run.lrs_at(step) or [[float(g["lr"]) for g in opt.param_groups] for opt in run.optimizers]
        fraction = self.config.warmup_cap_factor
        caps = [
            [min(fraction * lr, cap) for lr, cap in zip(group_lrs, group_caps, strict=True)]
            for group_lrs, group_caps in zip(lrs, lr_caps(run.optimizers), strict=True)
        ]
        return caps, lrs

    def _as_if(
        self, intent: Intent, run: RunState, cap: tuple[list[list[float]], list[list[float]]] | None = None
    ) -> tuple[Intent, float, float]:
        """A dry run: the intent's LR change made on copies of the param groups that carry the LR factors the live
        guard would have by now, and nothing done to the run; the intent (a cut that could not be made is held)
        and the first group's LR before and after, as the live guard would have had them. A rollback's LR after
        is the one before times its factor: the schedule's LR at the restored step is not known without
        restoring it."""
        paper = [_ParamGroups([dict(g) for g in opt.param_groups]) for opt in run.optimizers]
        if self._dry_factors is not None:
            set_lr_factors(paper, self._dry_factors[0])
            set_lr_caps(paper, self._dry_factors[1])
        lr_before = _first_lr(paper)
        if intent.action == Action.LR_CUT:
            if cut_lr(paper, intent.lr_factor, eps=self.config.eps):
                self.policy.lr_cut_made()  # counted as the live guard counts its cuts
            else:
                intent = replace(intent, action=Action.HELD, lr_factor=1.0, reason=NO_CUT)
            if cap is not None:
                set_lr_caps(paper, cap[0])
        elif intent.action == Action.ROLLBACK:
            _scale_lr_state(paper, lr_factors(paper), lr_caps(paper), intent.lr_factor)
            if cap is not None:
                set_lr_caps(paper, cap[0])
        self._dry_factors = (lr_factors(paper), lr_caps(paper))
        return intent, lr_before, _first_lr(paper)

    def _rollback(self, intent: Intent, run: RunState) -> tuple[Intent, str | None]:
        assert intent.rollback_to is not None
        factors, caps = lr_factors(run.optimizers), lr_caps(run.optimizers)
        run.restore(intent.rollback_to)  # the snapshot's optimizer state holds the LR factors and caps of its step
        if intent.from_snapshot:
            factors, caps = lr_factors(run.optimizers), lr_caps(run.optimizers)
        _scale_lr_state(run.optimizers, factors, caps, intent.lr_factor)
        return intent, None

    def _trial(self, intent: Intent, run: RunState) -> tuple[Intent, str | None]:
        """An LR trial: a snapshot of the state now, then the LR factor times the trial's raise."""
        self.policy.trial_started(run.take_snapshot())
        return self._scale(intent, run)

    def _scale(self, intent: Intent, run: RunState) -> tuple[Intent, str | None]:
        set_lr_factors(run.optimizers, [[f * intent.lr_factor for f in fs] for fs in lr_factors(run.optimizers)])
        return intent, None

    def _stop(self, intent: Intent, run: RunState) -> tuple[Intent, str | None]:
        assert intent.rollback_to is not None
        return intent, run.stop(intent.rollback_to)

    def _cut(self, intent: Intent, run: RunState) -> tuple[Intent, str | None]:
        if cut_lr(run.optimizers, intent.lr_factor, eps=self.config.eps):
            self.policy.lr_cut_made()
            return intent, None
        return replace(intent, action=Action.HELD, lr_factor=1.0, reason=NO_CUT), None

    def _nothing(self, intent: Intent, run: RunState) -> tuple[Intent, str | None]:
        return intent, None


@dataclass
class _ParamGroups:
    """Copies of an optimizer's param groups, for a dry run's LR changes."""

    param_groups: list[dict[str, Any]]


def _scale_lr_state(
    optimizers: Sequence[Any], factors: list[list[float]], caps: list[list[float]], factor: float
) -> None:
    """Set the LR factors and caps the guard had (a rollback does not undo them), each times ``factor``."""
    set_lr_factors(optimizers, [[f * factor for f in fs] for fs in factors])
    set_lr_caps(optimizers, [[c * factor for c in cs] for cs in caps])


def _first_lr(optimizers: Sequence[Any]) -> float:
    """The first param group's LR of the first optimizer (what a decision reports)."""
    return float(optimizers[0].param_groups[0]["lr"]) if optimizers else float("nan")
