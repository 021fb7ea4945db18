"""A picture of a run: its loss with each of the guard's decisions marked where it happened, and the LR beneath.

The loss panel marks a rollback with an arrow from the step of its event back to the step restored (the stretch
thrown away shaded), an LR cut with a triangle and its factor, a skipped (or scaled-down) update -- after a
rollback, or stopped by the gate or ``skip_spikes`` -- with a tick at the bottom, a stop with a bar, a decision
that changed nothing (a spike logged, a cut held) with a small circle, and a NaN or infinite loss with a cross at
the top. The LR panel beneath (log scale) shows the LR the run
trained with, the cuts marked on it.

Needs matplotlib (``pip install 'lr_guard[plot]'``), imported only when a picture is drawn; the figure is drawn
without pyplot (no window, no global state), so it is safe in a training process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lr_guard.events import Action, Decision, kind_name
from lr_guard.run_record import RunRecord

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

__all__ = ["FORMATS", "INSTALL_HINT", "draw_record", "draw_run", "save_figure", "to_rgb"]

INSTALL_HINT = "pip install 'lr_guard[plot]'"
FORMATS = ("png", "svg", "pdf")  # what save_figure writes, chosen by the file's extension

_COLOURS = {
    "rollback": "tab:red",
    "cut": "tab:orange",
    "skip": "tab:purple",
    "stop": "black",
    "logged": "tab:gray",
    "raise": "tab:green",
}


def _figure_class() -> type[Figure]:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"drawing a run's picture needs matplotlib: {INSTALL_HINT}") from err
    return Figure


def draw_record(record: RunRecord, decisions: Sequence[Decision], **kwargs: Any) -> Figure:
    """:func:`draw_run` of what a :class:`~lr_guard.run_record.RunRecord` holds (the range of each entry shaded
    when it holds several steps)."""
    return draw_run(
        record.steps,
        record.means,
        record.lrs,
        decisions,
        lows=record.lows if record.stride > 1 else None,
        highs=record.highs if record.stride > 1 else None,
        non_finite=record.non_finite,
        **kwargs,
    )


def draw_run(
    steps: Sequence[int],
    values: Sequence[float],
    lrs: Sequence[float],
    decisions: Sequence[Decision],
    *,
    lows: Sequence[float] | None = None,
    highs: Sequence[float] | None = None,
    non_finite: Sequence[int] | None = None,
    value_label: str = "loss",
    lr_label: str = "learning rate",
    title: str | None = None,
) -> Figure:
    """The picture of a run as a matplotlib ``Figure``.

    Args:
        steps: The step of each value, increasing.
        values: The watched value (the loss) at each step; NaN and infinities are marked, not drawn.
        lrs: The LR at each step (NaN where not known), drawn on the lower panel.
        decisions: The guard's decisions, as ``guard.decisions`` holds them (or a replay's).
        lows, highs: The range of the values each point stands for, shaded (a decimated record).
        non_finite: How many non-finite values each point stands for (default: the non-finite ``values``).
        value_label, lr_label: The panels' axis labels.
        title: The figure's title (default: what the guard did, counted).
    """
    import numpy as np

    figure = _figure_class()(figsize=(10, 5.6), dpi=100, layout="constrained")
    loss_ax, lr_ax = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    x = np.asarray(steps, dtype=float)
    y = np.asarray(values, dtype=float)
    finite = np.isfinite(y)
    loss_ax.plot(x, np.where(finite, y, np.nan), color="tab:blue", lw=1.0, label=value_label)
    if lows is not None and highs is not None:
        loss_ax.fill_between(x, lows, highs, color="tab:blue", alpha=0.2, lw=0, label="range of the steps drawn")
    if finite.any() and (y[finite] > 0).all() and y[finite].max() > 10 * y[finite].min():
        loss_ax.set_yscale("log")
    bad = np.asarray(non_finite, dtype=float) > 0 if non_finite is not None else ~finite
    top = loss_ax.get_xaxis_transform()  # x in steps, y in axes fractions
    if bad.any():
        (marks,) = loss_ax.plot(x[bad], np.full(int(bad.sum()), 0.97), "x", color="tab:red", ms=6, transform=top)
        marks.set(label=f"non-finite {value_label}", gid="lr_guard:non_finite")
    level = _level(x[finite], y[finite])
    _mark_decisions(loss_ax, lr_ax, decisions, level, int(x[-1]) if len(x) else 0)

    lr = np.asarray(lrs, dtype=float)
    known = np.isfinite(lr)
    if known.any():
        lr_ax.plot(x[known], lr[known], color="tab:green", lw=1.2, drawstyle="steps-post")
        if (lr[known] > 0).all():
            lr_ax.set_yscale("log")
    else:
        lr_ax.text(0.5, 0.5, "the LR is not known", ha="center", va="center", transform=lr_ax.transAxes)
    loss_ax.set_ylabel(value_label)
    lr_ax.set_ylabel(lr_label)
    lr_ax.set_xlabel("step")
    loss_ax.grid(alpha=0.3)
    lr_ax.grid(alpha=0.3)
    loss_ax.set_title(title if title is not None else _summary(decisions), fontsize=10)
    figure.legend(*loss_ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    return figure


def _level(x: np.ndarray, y: np.ndarray) -> Any:
    """The loss drawn at a step (for a marker of a decision there)."""
    import numpy as np

    def at(step: float) -> float:
        return float(np.interp(step, x, y)) if len(x) else math.nan

    return at


def _mark_decisions(loss_ax: Any, lr_ax: Any, decisions: Sequence[Decision], level: Any, last: int) -> None:
    top = loss_ax.get_xaxis_transform()
    first_rollback = True
    rollbacks = 0
    cuts: list[Decision] = []
    raises: list[Decision] = []  # the LR search's trials, and the raises it kept
    skips: list[int] = []
    stops: list[int] = []
    logged: list[tuple[int, float]] = []
    for decision in decisions:
        event = decision.event
        if decision.action == Action.ROLLBACK and decision.rollback_to is not None:
            label = "rollback: back to the step restored" if first_rollback else None
            discarded = loss_ax.axvspan(
                decision.rollback_to, max(decision.step, event.step), color=_COLOURS["rollback"], alpha=0.1, lw=0
            )
            discarded.set(label="steps thrown away" if first_rollback else None, gid="lr_guard:discarded")
            height = 0.92 - 0.06 * (rollbacks % 5)  # successive rollbacks one above the other
            rollbacks += 1
            arrow = loss_ax.annotate(
                "",
                xy=(decision.rollback_to, height),
                xytext=(event.step, height),
                xycoords=top,
                textcoords=top,
                arrowprops={"arrowstyle": "-|>", "color": _COLOURS["rollback"], "lw": 1.8},
            )
            arrow.set_gid("lr_guard:rollback")
            if label:  # an annotation has no legend entry: a line of the same colour stands for it
                loss_ax.plot([], [], color=_COLOURS["rollback"], lw=1.8, label=label)
            first_rollback = False
            # the updates skipped after it: the next ones from the step it was made at (those the run got to)
            skips += [s for s in range(decision.step, decision.step + decision.skip_batches) if s <= last]
        elif decision.action == Action.LR_CUT:
            cuts.append(decision)
        elif decision.action in (Action.LR_TRIAL, Action.LR_KEEP, Action.LR_UNDO):
            raises.append(decision)
        elif decision.action in (Action.SKIP, Action.CLIP):
            skips.append(event.step)
        elif decision.action == Action.STOP:
            stops.append(decision.step)
        else:
            value = event.value if math.isfinite(event.value) else level(event.step)
            logged.append((event.step, value))
    if cuts:
        steps = [d.event.step for d in cuts]
        (marks,) = loss_ax.plot(steps, [level(s) for s in steps], "v", color=_COLOURS["cut"], ms=9, mec="black")
        marks.set(label="LR cut (factor)", gid="lr_guard:lr_cut")
        for d, step in zip(cuts, steps, strict=True):
            loss_ax.annotate(
                f"×{d.lr_factor:g}", (step, level(step)), xytext=(0, 8), textcoords="offset points", ha="center",
                fontsize=7, color=_COLOURS["cut"],
            )  # fmt: skip
        lr_ax.plot([d.step for d in cuts], [d.lr_after for d in cuts], "v", color=_COLOURS["cut"], ms=7, mec="black")
    trials = [d for d in raises if d.action == Action.LR_TRIAL]
    if trials:
        steps = [d.step for d in trials]
        (marks,) = loss_ax.plot(steps, [level(s) for s in steps], "^", color=_COLOURS["raise"], ms=8, mec="black")
        marks.set(label="LR trial (raise from a snapshot)", gid="lr_guard:lr_trial")
        lr_ax.plot(steps, [d.lr_after for d in trials], "^", color=_COLOURS["raise"], ms=7, mec="black")
    kept = [d.step for d in raises if d.action == Action.LR_KEEP]
    if kept:
        (marks,) = loss_ax.plot(kept, [level(s) for s in kept], "*", color=_COLOURS["raise"], ms=10, mec="black")
        marks.set(label="LR trial kept", gid="lr_guard:lr_keep")
    if skips:
        (ticks,) = loss_ax.plot(skips, [0.03] * len(skips), "|", color=_COLOURS["skip"], ms=10, transform=top)
        ticks.set(label="update skipped", gid="lr_guard:skip")
    for i, step in enumerate(stops):
        bar = loss_ax.axvline(step, color=_COLOURS["stop"], lw=3)
        bar.set(label="stop" if i == 0 else None, gid="lr_guard:stop")
        lr_ax.axvline(step, color=_COLOURS["stop"], lw=3)
    if logged:
        (dots,) = loss_ax.plot(*zip(*logged, strict=True), "o", mfc="none", color=_COLOURS["logged"], ms=5)
        dots.set(label="seen, no action (spike, held cut)", gid="lr_guard:logged")


def _summary(decisions: Sequence[Decision]) -> str:
    counts: dict[str, int] = {}
    for decision in decisions:
        if decision.action in (Action.NONE, Action.HELD):
            key = f"{kind_name(decision.event.kind)} seen"
        else:
            key = {"lr_cut": "LR cut", "skip": "skipped update", "clip": "scaled update"}.get(
                decision.action.value, decision.action.value
            )
        counts[key] = counts.get(key, 0) + 1
    done = ", ".join(f"{n} {key}{'s' if n > 1 and not key.endswith('seen') else ''}" for key, n in counts.items())
    return f"lr_guard: {done or 'no decisions'}"


def to_rgb(figure: Figure) -> np.ndarray:
    """The figure rendered as an ``(height, width, 3)`` uint8 image (for TensorBoard's ``add_image``)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


def save_figure(figure: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``figure`` to ``path``, as PNG, SVG or PDF by its extension."""
    path = Path(path)
    kind = path.suffix.lower().lstrip(".")
    if kind not in FORMATS:
        raise ValueError(f"a picture is written as {', '.join(FORMATS)} by the file's extension; got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format=kind)
    return path
