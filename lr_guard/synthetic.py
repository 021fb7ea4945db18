"""Seeded, realistic loss streams that carry their true events -- for tests and the detection benchmark.

The model, in log space: training progress ``tau`` advances by ``lr(t) / lr_max`` per step (so warm-up is slow,
and a decayed LR slows progress); the clean loss is ``c + a * (tau + t0) ** -b`` (a power law) plus an LR-dependent
excess ``k * lr(t) / lr_max`` (so a scheduled drop gives a sudden fall, as in real step schedules); batch noise is
multiplicative, Student-t with ``noise_df`` degrees of freedom (heavier-tailed than Gaussian, like real
per-batch losses), with a scale that shrinks as the LR decays; ``noise=`` names a family instead (``NOISES``:
Student-t(6), Student-t(3) or Gaussian, each with the robust sigma, i.e. the median absolute draw, of the default).
Trouble is then injected, and its true extent returned as :class:`TrueEvent` windows: a detection inside
``[start, end]`` is correct.

Example:
    >>> stream = make_stream(seed=3, n_steps=500, inject="spike")
    >>> [(e.kind.value, e.start, e.end) for e in stream.events]
    [('spike', 217, 217), ('spike', 357, 359), ('spike', 412, 413)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from lr_guard.events import EventKind

__all__ = ["INJECTIONS", "NOISES", "SCHEDULES", "LossStream", "TrueEvent", "make_stream", "make_suite"]

SCHEDULES = ("constant", "step", "cosine")
INJECTIONS = (None, "spike", "oscillation", "plateau", "divergence", "stuck")
NOISES = ("student_t6", "student_t3", "gaussian")
_NOISE_DF = {"student_t6": 6.0, "student_t3": 3.0, "gaussian": math.inf}
# The smallest injected spike is at least as high as the noise itself reaches once in this many steps.
SPIKE_RARITY = 1e5


@dataclass(frozen=True)
class TrueEvent:
    """A labelled stretch of a stream: a detection of ``kind`` at any step in ``[start, end]`` is correct."""

    kind: EventKind
    start: int
    end: int
    detail: str = ""


@dataclass(frozen=True)
class LossStream:
    """Loss values at steps ``0 .. len(values) - 1`` with their true events and the LR schedule used."""

    values: np.ndarray
    lr: np.ndarray
    events: tuple[TrueEvent, ...]
    seed: int
    description: str
    noise_sigma: float = field(default=0.0)
    log_every: int = 1  # training steps per logged value: value i is at step i * log_every

    def __len__(self) -> int:
        return len(self.values)


def _lr_schedule(rng: np.random.Generator, n: int, schedule: str, warmup: int) -> np.ndarray:
    t = np.arange(n, dtype=float)
    if schedule == "constant":
        lr = np.ones(n)
    elif schedule == "step":
        lr = np.ones(n)
        for frac in sorted(rng.uniform(0.45, 0.8, size=int(rng.integers(1, 3)))):
            lr[int(frac * n) :] *= 0.3
    elif schedule == "cosine":  # to 10% of the peak: a run that is cut before the LR vanishes
        lr = 0.1 + 0.9 * 0.5 * (1.0 + np.cos(np.pi * t / n))
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warmup > 0:
        lr[:warmup] *= (t[:warmup] + 1.0) / warmup
    return lr


def _stop_progress(
    rng: np.random.Generator,
    inject: str,
    lr: np.ndarray,
    progress: np.ndarray,
    swing: np.ndarray,
    start_min: int,
    sigma0: float,
    scale: float = 1.0,
) -> TrueEvent:
    """Make progress stop (in place): a plateau, or an oscillation swinging far beyond the noise."""
    n_steps = len(lr)
    if inject == "plateau":  # progress stops for 1600..2400 steps at a constant LR, then resumes
        start = int(rng.integers(start_min, max(start_min + 1, n_steps // 3)))
        end = min(n_steps - 1, start + int(int(rng.integers(1600, 2400)) * scale))
        progress[start:end] = 0.0
        lr[start:end] = lr[start]  # real plateaus sit at a constant LR (between a step schedule's drops)
        return TrueEvent(EventKind.PLATEAU, start, end, "progress stops")
    # oscillation: LR too high, no progress, swings far beyond the noise
    start = int(rng.integers(start_min, n_steps - 500))
    length = int(rng.integers(200, 400))
    end = min(n_steps - 1, start + length)
    period = float(rng.choice([2.0, 3.0, 4.0, 6.0, 8.0, 12.0]))
    amplitude = min(sigma0 * float(rng.uniform(5.0, 12.0)), math.log(1.25))  # 5-12 sigma, at most +-25%
    tt = np.arange(end - start)
    swing[start:end] = amplitude * np.cos(2.0 * np.pi * tt / period + float(rng.uniform(0, 2 * np.pi)))
    progress[start:end] = 0.0
    return TrueEvent(EventKind.OSCILLATION, start, end, f"period {period:g}, amplitude {amplitude:.3g}")


def _noise_draws(rng: np.random.Generator, n_steps: int, df: float, divisor: float) -> tuple[np.ndarray, float]:
    """Student-t(``df``) draws (Gaussian for ``inf``) divided by ``divisor``, and the height the noise reaches
    once in ``SPIKE_RARITY`` steps, in the same units."""
    if not math.isfinite(df):
        return rng.standard_normal(n_steps) / divisor, float(stats.norm.isf(1.0 / SPIKE_RARITY)) / divisor
    return rng.standard_t(df, size=n_steps) / divisor, float(stats.t.isf(1.0 / SPIKE_RARITY, df)) / divisor


def _add_trouble(
    rng: np.random.Generator,
    inject: str,
    extra: np.ndarray,
    noise_scale: np.ndarray,
    start_min: int,
    rare_draw: float = 0.0,
) -> list[TrueEvent]:
    """Add spikes or a divergence to the log-loss (in place, in ``extra``); ``rare_draw``: the noise's once-in-
    ``SPIKE_RARITY`` height, in noise sigmas, which the smallest spike reaches (a lower spike is just noise)."""
    n_steps = len(extra)
    events = []
    if inject == "spike":  # 1..4 spikes of 10..40 noise sigmas (more in heavier tails), 1..3 steps, >= 100 apart
        low = max(10.0, rare_draw)
        steps = np.arange(start_min, n_steps - 60, 100)
        for s in sorted(rng.choice(steps, size=min(len(steps), int(rng.integers(1, 5))), replace=False)):
            s = int(s + rng.integers(0, 50))
            height = float(rng.uniform(low, 4.0 * low)) * noise_scale[s]
            duration = int(rng.integers(1, 4))
            for i in range(duration):
                extra[s + i] = height * 0.5**i
            events.append(TrueEvent(EventKind.SPIKE, s, s + duration - 1, f"+{height:.3g} nats"))
        return events
    s = int(rng.integers(start_min, n_steps - 400))
    how = str(rng.choice(["nan", "explode", "rise"]))
    t_after = np.arange(n_steps - s, dtype=float)
    if how == "nan":
        extra[s:] = np.nan
    elif how == "explode":  # exponential blow-up, then inf, then NaN (as the criteo log)
        rate = float(rng.uniform(0.05, 0.5))
        with np.errstate(over="ignore"):
            extra[s:] = np.expm1(rate * t_after)
        blow = s + int(np.argmax(extra[s:] > 50.0)) if (extra[s:] > 50.0).any() else n_steps
        extra[blow:] = np.inf
        extra[blow + 1 :] = np.nan
    else:  # slow sustained rise: loss doubles to quadruples over 100-400 steps
        rate = math.log(float(rng.uniform(2.0, 4.0))) / float(rng.uniform(100.0, 400.0))
        extra[s:] = rate * t_after
    return [TrueEvent(EventKind.DIVERGENCE, s, n_steps - 1, how)]


def make_stream(
    seed: int,
    n_steps: int = 3000,
    inject: str | None = None,
    schedule: str | None = None,
    warmup_steps: int | None = None,
    noise_df: float = 6.0,
    log_every: int = 1,
    log_mean: bool = False,
    pace: float = 1.0,
    noise: str | None = None,
) -> LossStream:
    """Make one labelled loss stream.

    Args:
        seed: Seed of everything random in the stream.
        n_steps: Training steps of the run (the stream holds ``n_steps // log_every`` values).
        inject: ``None`` (clean), ``"spike"``, ``"oscillation"``, ``"plateau"``, ``"divergence"`` or ``"stuck"``
            (a run that never learns: the loss rises during the LR warm-up, then sits at its starting level with
            a drift of a few hundredths; labelled a plateau from the end of the warm-up to the end).
        schedule: ``"constant"``, ``"step"`` or ``"cosine"``; drawn from the seed when ``None``.
        warmup_steps: LR warm-up length; drawn from 0..150 steps per 3000 when ``None``.
        noise_df: Degrees of freedom of the Student-t batch noise (``inf`` for Gaussian), scaled to unit variance.
        noise: A named noise family instead of ``noise_df``, one of ``NOISES``: ``"student_t6"`` (the default's
            noise), ``"student_t3"`` (heavy tails) or ``"gaussian"``, each scaled to the robust sigma (median
            absolute draw) of the default noise, so only the tails differ.
        log_every: Training steps per logged value (100: a sparse log; an epoch's steps: a per-epoch log).
            Runs longer than 3000 steps draw their warm-up and their plateau's length in proportion.
        log_mean: ``False``: each logged value is the loss of one step (every ``log_every``-th, from step 0);
            ``True``: the mean over its ``log_every`` steps, as a per-epoch training loss.
        pace: Progress per step relative to the default (0.05: a run that improves twenty times more slowly
            against the same per-step noise, as a long LLM run at a constant LR).

    Events are in logged values: a true event covers the values whose steps it covers (a spike between two
    sparse values is not in the log, and has no event).
    """
    if inject not in INJECTIONS:
        raise ValueError(f"inject must be one of {INJECTIONS}, got {inject!r}")
    if noise is not None and noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES} or None, got {noise!r}")
    if noise is not None and noise_df != 6.0:
        raise ValueError(f"give noise or noise_df, not both; got noise={noise!r} and noise_df={noise_df!r}")
    if not isinstance(n_steps, int) or n_steps < 300:
        raise ValueError(f"n_steps must be an int >= 300, got {n_steps!r}")
    if not isinstance(log_every, int) or not 1 <= log_every <= n_steps // 50:
        raise ValueError(f"log_every must be an int from 1 to n_steps // 50 ({n_steps // 50}), got {log_every!r}")
    if not isinstance(pace, (int, float)) or not 0.0 < pace <= 1.0:
        raise ValueError(f"pace must be a number in (0, 1], got {pace!r}")
    rng = np.random.default_rng(seed)
    scale = max(1.0, n_steps / 3000.0)  # a longer run has a longer warm-up and longer plateaus
    schedule = schedule if schedule is not None else str(rng.choice(SCHEDULES))
    warmup = int(int(rng.integers(0, 151)) * scale) if warmup_steps is None else warmup_steps
    if inject == "stuck":
        warmup = max(warmup, int(0.02 * n_steps))  # the warm-up is what lifts the loss of a run that never learns
    lr = _lr_schedule(rng, n_steps, schedule, warmup)

    c = float(rng.uniform(0.1, 3.0))  # irreducible loss
    a = c * float(rng.uniform(1.0, 4.0))
    b = float(rng.uniform(0.3, 0.8))
    t0 = float(rng.uniform(10.0, 100.0))
    k = c * float(rng.uniform(0.02, 0.15))
    sigma0 = float(rng.uniform(0.01, 0.05))
    progress = lr * pace
    events: list[TrueEvent] = []
    swing = np.zeros(n_steps)
    extra = np.zeros(n_steps)
    start_min = warmup + int(200 * scale)

    if inject in ("plateau", "oscillation"):
        events.append(_stop_progress(rng, inject, lr, progress, swing, start_min, sigma0, scale))
    elif inject == "stuck":  # tau moves by 0.5 in the whole run: the loss stays where it started
        progress *= 0.5 / float(progress.sum())
        events.append(TrueEvent(EventKind.PLATEAU, warmup, n_steps - 1, "never learns"))

    tau = np.cumsum(progress)
    clean = np.log(c + a * (tau + t0) ** (-b) + k * lr / lr.max())
    noise_scale = sigma0 * (0.5 + 0.5 * lr / lr.max())
    if noise is None:  # unit variance
        df, divisor = noise_df, (math.sqrt(noise_df / (noise_df - 2.0)) if math.isfinite(noise_df) else 1.0)
    else:  # the default noise's median absolute draw
        df = _NOISE_DF[noise]
        divisor = _median_abs_draw(df) / _DEFAULT_MEDIAN_DRAW
    draws, rare_draw = _noise_draws(rng, n_steps, df, divisor)
    y = clean + noise_scale * draws + swing

    if inject in ("spike", "divergence"):
        events.extend(_add_trouble(rng, inject, extra, noise_scale, start_min, rare_draw))

    with np.errstate(over="ignore", invalid="ignore"):
        values = np.exp(y + extra)
    description = (
        f"seed {seed}: {schedule} schedule, warm-up {warmup}, noise {sigma0:.3g} ({noise or f't{noise_df:g}'}), "
        f"inject {inject}"
    )
    events.extend(_natural_plateaus(clean, noise_scale, events))
    if log_every == 1:
        return LossStream(values, lr, tuple(events), seed, description, sigma0)
    # the same run logged at another cadence has the same true events, natural plateaus included
    k, n_logged = log_every, n_steps // log_every
    if log_mean:
        with np.errstate(over="ignore", invalid="ignore"):
            values = values[: n_logged * k].reshape(n_logged, k).mean(axis=1)
        events = [TrueEvent(e.kind, e.start // k, min(n_logged - 1, e.end // k), e.detail) for e in events]
    else:
        values = values[::k][:n_logged]
        events = [
            TrueEvent(e.kind, -(-e.start // k), min(n_logged - 1, e.end // k), e.detail)
            for e in events
            if -(-e.start // k) <= min(n_logged - 1, e.end // k)
        ]
    description += f", every {k} steps" + (" (means)" if log_mean else "")
    return LossStream(values, lr[::k][:n_logged], tuple(events), seed, description, sigma0, k)


def _median_abs_draw(df: float) -> float:
    """The median of ``|x|`` for a standard Student-t(``df``) draw ``x`` (Gaussian for ``inf``)."""
    return float(stats.norm.ppf(0.75)) if not math.isfinite(df) else float(stats.t.ppf(0.75, df))


_DEFAULT_MEDIAN_DRAW = _median_abs_draw(6.0) * math.sqrt(4.0 / 6.0)  # the default noise: t(6) at unit variance

NATURAL_HORIZON = 1000


def _natural_plateaus(clean: np.ndarray, noise_scale: np.ndarray, injected: list[TrueEvent]) -> list[TrueEvent]:
    """Stretches where the noise-free loss itself stops improving (late power-law tails, a loss that rose during
    warm-up): over the trailing ``NATURAL_HORIZON`` steps (or a quarter of the run, if that is longer) it fell by
    less than ``0.25`` of the per-step noise; and, from the start, the steps before it first gets ``0.25`` of the
    noise below its starting value (a warm-up that has not yet made progress).

    Nobody injected them, yet "no meaningful improvement" is true there, so they are labelled with
    ``detail="natural"``: the benchmark counts a plateau detection there neither as a hit nor as a false alarm.
    """
    h = max(NATURAL_HORIZON, len(clean) // 4)
    if len(clean) <= h:
        return []
    flat = np.zeros(len(clean), dtype=bool)
    flat[h:] = clean[:-h] - clean[h:] < 0.25 * noise_scale[h:]
    progressed = np.flatnonzero(clean[0] - clean >= 0.25 * noise_scale)
    flat[: progressed[0] if len(progressed) else len(clean)] = True
    for e in injected:  # an injected plateau is labelled already
        if e.kind == EventKind.PLATEAU:
            flat[e.start : e.end + 1] = False
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat.astype(np.int8), [0]])))
    return [
        TrueEvent(EventKind.PLATEAU, int(a), int(b) - 1, "natural")
        for a, b in zip(edges[::2], edges[1::2], strict=True)
    ]


def make_suite(
    inject: str | None, n_streams: int, seed: int = 0, n_steps: int = 3000, **options: Any
) -> list[LossStream]:
    """``n_streams`` streams of one injection kind; every (seed, kind) pair draws its own streams. ``options``
    go to :func:`make_stream` (``log_every``, ``log_mean``, ``pace``, ``noise`` -- one of ``NOISES``: the same
    seeds with another noise family -- ...)."""
    base = seed * 1_000_000 + INJECTIONS.index(inject) * 100_000
    return [make_stream(base + i, n_steps=n_steps, inject=inject, **options) for i in range(n_streams)]
