"""What LRGuard() costs per training step: a Trainer with and without it, on the same model and data.

    python benchmarks/overhead.py                 # tiny MLP on CPU (and on the GPU when there is one), small MLP
    python benchmarks/overhead.py --gpt           # also a ~85M-parameter GPT-style model
    python benchmarks/overhead.py --repeats 5 --steps 4000
    python benchmarks/overhead.py --parts         # also: what the detectors and the snapshots cost

Wall clock, interleaved within one run: a shared machine's step time drifts by tens of percent from one minute
to the next, so separate bare and guarded runs, even interleaved, differ by more than the overhead. Here one
Trainer runs with the guard for ``block`` steps (its check cadence, 8: one batched check per block), without it
for the next ``block`` steps, and so on -- the guard is put into and taken out of ``trainer.callbacks``, so a
step "without" is a bare Trainer's step and one "with" pays all a callback pays, Lightning's hook dispatch
included. Steps with and steps without are thus interleaved every few milliseconds and drift cancels. Per run:
``overhead_pct`` = mean step with / mean step without - 1 (the cost to a run's total time: it includes the
batched checks and the snapshots; steps over 10x the median, the machine's hiccups, are left out of both and
counted), ``overhead_median_pct`` the same for the median step (the ratio of medians: less moved by the rare slow
steps, though not untouched by them -- every 8th step with the guard checks a batch, and with an eighth of the
steps at the top, the median of the rest is read higher up). The same is measured for a callback that does
nothing: Lightning calls every hook of every callback, so that is the floor any callback pays. Figures are the
median over ``--repeats`` runs.

``guard_us_per_step`` is the median time spent inside the guard's own hooks per step, from a separate
instrumented run; ``guard_us_mean`` their mean (with the batched checks and the snapshots), and
``guard_share_pct`` that mean as a share of the rest of the step (the same run's mean step time less the hooks'
mean). On a GPU, host synchronisations inside the guard's hooks are counted with
``torch.cuda.set_sync_debug_mode("warn")``.

Models: ``tiny`` (a 2k-parameter MLP whose step is Lightning's own bookkeeping, about 1 ms on CPU), ``small`` (a
0.33M-parameter MLP at batch 128, CPU only: a step with some arithmetic in it) and, with ``--gpt``, the GPT-style
model (on CPU only its hooks are timed: a step takes over a second there, and no wall clock resolves microseconds
in it). The headline figures are the tiny model's (on a GPU, the GPT-style model's).

``gate_us_per_step`` is what ``LRGuard(gate=True)`` (the update gate) adds to the hooks' median time per step on
the tiny model, from instrumented runs with and without it in turn; ``gate_inside_us`` the median time of the
gate's own work in a step (the gradient norm, reading it and the loss, the verdict).

The last line is one JSON object: ``cpu_overhead_pct`` (the ratio of mean steps), ``cpu_overhead_median_pct``,
``guard_us_per_step``, ``gate_us_per_step`` and, where a GPU was used, ``gpu_overhead_pct`` and
``gpu_syncs_per_step``; per-model figures are nested under the model's name.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import statistics
import tempfile
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lr_guard import LRGuard
from lr_guard.actions import SnapshotStore
from lr_guard.diagnostics import one_event_writer, scalars, write_one_event

HOOKS = ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step", "on_train_batch_end")


class TinyMLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(4096, 32, generator=g), torch.randn(4096, 1, generator=g))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=32)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class SmallMLP(pl.LightningModule):
    """A small classifier that does some arithmetic per step: 128 -> 512 -> 512 -> 10 (0.33M parameters), batch 128."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(8192, 128, generator=g), torch.randint(0, 10, (8192,), generator=g))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=128)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class GPT(pl.LightningModule):
    """A GPT-style causal transformer: 12 layers, width 768, vocabulary 2048 (88M parameters)."""

    def __init__(self, batch: int, seq: int, layers: int = 12, width: int = 768, vocab: int = 2048) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(seq, width))
        layer = nn.TransformerEncoderLayer(
            width, width // 64, 4 * width, dropout=0.0, batch_first=True, norm_first=True, activation="gelu"
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab, bias=False)
        self.batch, self.seq, self.vocab = batch, seq, vocab
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    mask: torch.Tensor

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens = batch[0]
        h = self.embed(tokens[:, :-1]) + self.pos[: self.seq - 1]
        h = self.blocks(h, mask=self.mask[: self.seq - 1, : self.seq - 1], is_causal=True)
        return nn.functional.cross_entropy(self.head(h).flatten(0, 1), tokens[:, 1:].flatten())

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, self.vocab, (self.batch * 64, self.seq), generator=g)
        return DataLoader(TensorDataset(tokens), batch_size=self.batch)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=3e-4)


class StepClock(pl.Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize()  # the benchmark's clock, not the guard's: it times whole steps
        self.starts.append(time.perf_counter())


class Alternate(StepClock):
    """Puts ``guest`` into ``trainer.callbacks`` for one block of steps and takes it out for the next, and times
    every step. Listed first, so a guest added at a block's start still gets that step's every hook."""

    def __init__(self, guest: pl.Callback, block: int) -> None:
        super().__init__()
        self.guest, self.block = guest, block
        self.present: list[bool] = []

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        present = (len(self.starts) // self.block) % 2 == 0  # in for the first block: it saw the run start
        callbacks = trainer.callbacks
        if present and self.guest not in callbacks:
            callbacks.append(self.guest)
        elif not present and self.guest in callbacks:
            callbacks.remove(self.guest)
        self.present.append(present)
        super().on_train_batch_start(trainer, module, batch, batch_idx)

    def on_train_end(self, trainer: Any, module: Any) -> None:
        if self.guest not in trainer.callbacks:
            trainer.callbacks.append(self.guest)  # for its teardown

    def overhead(self, warmup_blocks: int = 2) -> dict[str, float]:
        """Steps with the guest against steps without it, after ``warmup_blocks`` blocks of each."""
        first = 2 * warmup_blocks * self.block
        durations = [b - a for a, b in itertools.pairwise(self.starts)]  # a step: from its start to the next's
        steps = list(zip(durations[first:], self.present[first : len(durations)], strict=True))
        limit = 10 * statistics.median(d for d, _ in steps)  # the machine's hiccups, not the guest's
        with_guest = [d for d, p in steps if p and d <= limit]
        without = [d for d, p in steps if not p and d <= limit]
        mean_with, mean_without = statistics.mean(with_guest), statistics.mean(without)
        return {
            "step_ms": 1e3 * mean_without,
            "overhead_pct": 100.0 * (mean_with / mean_without - 1.0),
            "overhead_median_pct": 100.0 * (statistics.median(with_guest) / statistics.median(without) - 1.0),
            "overhead_us": 1e6 * (mean_with - mean_without),
            "hiccups": len(steps) - len(with_guest) - len(without),
        }


class TimedGuard(LRGuard):
    """LRGuard whose hooks record the time spent in them per step (and host syncs on a GPU)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.per_step: dict[int, float] = {}
        self.syncs = 0
        for name in HOOKS:
            setattr(self, name, self._timed(getattr(self, name)))

    def _timed(self, hook: Any) -> Any:
        def run(trainer: Any, *args: Any, **kwargs: Any) -> Any:
            step = trainer.global_step
            cuda = torch.cuda.is_available() and trainer.lightning_module.device.type == "cuda"
            # syncs are counted on a GPU only: on CPU, catching warnings would cost more than the hooks
            with warnings.catch_warnings(record=True) if cuda else contextlib.nullcontext([]) as caught:
                if cuda:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                start = time.perf_counter()
                try:
                    return hook(trainer, *args, **kwargs)
                finally:
                    elapsed = time.perf_counter() - start
                    if cuda:
                        torch.cuda.set_sync_debug_mode("default")
                        self.syncs += sum("synchroniz" in str(w.message) for w in caught)
                    self.per_step[step] = self.per_step.get(step, 0.0) + elapsed

        return run


def fit(make: Any, callbacks: list[Any], steps: int, device: str) -> None:
    """Train ``steps`` steps with Lightning's default logger, a TensorBoardLogger (the guard's diagnostics are
    part of what it costs; the bare steps have the same logger), writing to a temporary directory."""
    pl.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            max_steps=steps,
            callbacks=callbacks,
            accelerator=device,
            devices=1,
            logger=TensorBoardLogger(root, name="overhead"),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            max_epochs=-1,
        )
        trainer.fit(make())


class NoOpCallback(pl.Callback):
    """A callback that does nothing: what Lightning's hook dispatch costs any callback."""


def interleaved(make: Any, guest: pl.Callback, device: str, steps: int, block: int) -> dict[str, float]:
    """One run in which ``guest`` is in for a block of steps and out for the next (see the module's doc)."""
    clock = Alternate(guest, block)
    fit(make, [clock, guest], max(steps, 6 * block) + 1, device)
    return clock.overhead()


def measure(
    name: str,
    make: Any,
    device: str,
    steps: int,
    repeats: int,
    guard_kwargs: dict[str, Any] | None = None,
    wall_clock: bool = True,
) -> dict[str, Any]:
    """The guard's wall-clock overhead (``wall_clock``: interleaved runs, see the module's doc) and the time spent
    inside its hooks (an instrumented run)."""
    kwargs = guard_kwargs or {}
    out: dict[str, Any] = {}
    text = ""
    if wall_clock:
        block = LRGuard(**kwargs).check_every_n_steps  # one batched check per block
        runs: dict[str, list[dict[str, float]]] = {"guard": [], "noop": []}
        fit(make, [LRGuard(**kwargs)], min(steps, 100), device)  # warm-up, discarded: a first run is slower
        for _ in range(repeats):
            runs["guard"].append(interleaved(make, LRGuard(**kwargs), device, steps, block))
            runs["noop"].append(interleaved(make, NoOpCallback(), device, steps, block))

        def median_of(kind: str, key: str) -> float:
            return statistics.median(run[key] for run in runs[kind])

        out = {
            "step_ms": median_of("guard", "step_ms"),
            "overhead_pct": median_of("guard", "overhead_pct"),
            "overhead_pct_runs": [round(run["overhead_pct"], 3) for run in runs["guard"]],
            "overhead_median_pct": median_of("guard", "overhead_median_pct"),
            "overhead_us": median_of("guard", "overhead_us"),
            "noop_callback_overhead_pct": median_of("noop", "overhead_pct"),
            "noop_callback_overhead_us": median_of("noop", "overhead_us"),
            "hiccups": sum(run["hiccups"] for kind in runs for run in runs[kind]),
        }
        text = (
            f"step {out['step_ms']:8.3f} ms; with the guard: mean step {out['overhead_pct']:+6.2f}%"
            f" ({out['overhead_us']:+.1f} us), median step {out['overhead_median_pct']:+6.2f}% (runs:"
            f" {', '.join(f'{v:+.2f}%' for v in out['overhead_pct_runs'])}); a do-nothing callback:"
            f" {out['noop_callback_overhead_pct']:+5.2f}% ({out['noop_callback_overhead_us']:+.1f} us).  "
        )
    timed = TimedGuard(**kwargs)
    timed_clock = StepClock()
    warmup = min(20, steps // 5)
    fit(make, [timed, timed_clock], steps, device)
    hook_times = [t for s, t in timed.per_step.items() if s >= warmup]
    starts = timed_clock.starts[warmup:]
    mean_step = (starts[-1] - starts[0]) / (len(starts) - 1)  # the instrumented run's own mean step
    out.update(
        {
            "instrumented_step_ms": 1e3 * mean_step,
            "guard_us_per_step": 1e6 * statistics.median(hook_times),
            "guard_us_p90": 1e6 * sorted(hook_times)[int(0.9 * len(hook_times))],
            "guard_us_mean": 1e6 * statistics.mean(hook_times),
            # within that one run, so a machine that is slower for a while scales both alike
            "guard_share_pct": 100.0 * statistics.mean(hook_times) / (mean_step - statistics.mean(hook_times)),
        }
    )
    if device == "cuda":
        out["syncs_per_step"] = timed.syncs / max(1, len(timed.per_step))
    print(
        f"{name:<8} {device:<5} {text}Inside the hooks: {out['guard_us_per_step']:.1f} us/step (median),"
        f" {out['guard_us_p90']:.1f} us (p90), {out['guard_us_mean']:.1f} us (mean: {out['guard_share_pct']:.3f}% of"
        f" the rest of a {1e3 * mean_step:.2f} ms step)"
        + (f", {out['syncs_per_step']:.2f} host syncs/step" if device == "cuda" else "")
    )
    return out


PARTS: dict[str, dict[str, Any]] = {
    "full": {},
    "no_diagnostics": {"diagnostics": False},
    "no_snapshots": {"rollback": False},
    "no_detectors": {"spike": False, "oscillation": False, "plateau": False, "divergence": False},
    "hooks_only": {"spike": False, "oscillation": False, "plateau": False, "divergence": False, "rollback": False},
}


def measure_parts(make: Any, device: str, steps: int, repeats: int) -> dict[str, float]:
    """The hooks' mean time per step with parts of the guard switched off (the best of ``repeats`` runs each):
    the differences say what the detectors and the snapshots cost."""
    warmup = min(50, steps // 5)
    best: dict[str, float] = {}
    for _ in range(repeats):
        for name, kwargs in PARTS.items():
            timed = TimedGuard(**kwargs)
            fit(make, [timed], steps, device)
            mean = statistics.mean(t for s, t in timed.per_step.items() if s >= warmup)
            best[name] = min(best.get(name, math.inf), 1e6 * mean)
    out = {f"{name}_us_mean": value for name, value in best.items()}
    out["detectors_us"] = best["no_snapshots"] - best["hooks_only"]
    out["snapshots_us"] = best["no_detectors"] - best["hooks_only"]
    out["diagnostics_us"] = best["full"] - best["no_diagnostics"]
    out.update(time_inside(make, device, steps, warmup))
    out.update(time_scalar_writes())
    print(
        f"parts    {device:<5} hooks' mean per step: all {best['full']:.1f} us; without diagnostics "
        f"{best['no_diagnostics']:.1f}; without snapshots {best['no_snapshots']:.1f}; without detectors "
        f"{best['no_detectors']:.1f}; hooks and checks only {best['hooks_only']:.1f} -> diagnostics "
        f"~{out['diagnostics_us']:.1f} us, detectors and policy ~{out['detectors_us']:.1f} us, snapshots "
        f"~{out['snapshots_us']:.1f} us. Policy and detectors per value: {out['first_value_us']:.1f} us for the "
        f"first of a batch, {out['other_values_us']:.1f} us for the others (medians); one snapshot: "
        f"{out['snapshot_us']:.0f} us (median). Writing one step's {out['scalars']} scalars to TensorBoard: "
        f"{out['one_event_us']:.0f} us as one event, {out['log_metrics_us']:.0f} us through log_metrics (one "
        f"event each)"
    )
    return out


def time_scalar_writes(rounds: int = 200) -> dict[str, float]:
    """One logged step's scalars written to a TensorBoardLogger as the guard writes them (one event) and through
    Lightning's ``log_metrics`` (one event per scalar), µs per step, each flushed at the end."""
    guard = LRGuard()
    group = torch.optim.AdamW(nn.Linear(2, 2).parameters()).param_groups[0]
    metrics = scalars(1.0, guard.detectors, [("opt0_group0", group)], guard.counts)
    out: dict[str, float] = {"scalars": len(metrics)}
    with tempfile.TemporaryDirectory() as root:
        for key, name in (("one_event_us", "one"), ("log_metrics_us", "each")):
            logger = TensorBoardLogger(root, name=name)
            writer = one_event_writer(logger)
            assert writer is not None
            start = time.perf_counter()
            for step in range(rounds):
                if key == "one_event_us":
                    write_one_event(logger, writer, metrics, step)
                else:
                    logger.log_metrics(metrics, step=step)
            writer.flush()
            out[key] = 1e6 * (time.perf_counter() - start) / rounds
            writer.close()
    return out


def measure_gate(make: Any, device: str, steps: int, repeats: int) -> dict[str, float]:
    """What the update gate adds to the guard's hooks per step: instrumented runs with and without it, in turn
    (``gate_us_per_step``: the difference of the medians of the hooks' time per step), and the median time of the
    gate's own work inside a step (``gate_inside_us``: the gradient norm, reading it and the loss, the verdict)."""
    from lr_guard.callbacks.skipper import UpdateSkipper

    warmup = min(50, steps // 5)
    medians: dict[bool, list[float]] = {False: [], True: []}
    inside: list[float] = []
    original = UpdateSkipper._gate

    def timed_gate(self: Any, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(self, *args)
        finally:
            inside.append(time.perf_counter() - start)

    UpdateSkipper._gate = timed_gate  # type: ignore[method-assign]
    try:
        for _ in range(repeats):
            for gate in (False, True):
                timed = TimedGuard(gate=gate)
                fit(make, [timed], steps, device)
                medians[gate].append(statistics.median(t for s, t in timed.per_step.items() if s >= warmup))
    finally:
        UpdateSkipper._gate = original  # type: ignore[method-assign]
    out = {
        "gate_us_per_step": 1e6 * (statistics.median(medians[True]) - statistics.median(medians[False])),
        "hooks_us_with_gate": 1e6 * statistics.median(medians[True]),
        "hooks_us_without_gate": 1e6 * statistics.median(medians[False]),
        "gate_inside_us": 1e6 * statistics.median(inside[warmup:]),
    }
    print(
        f"gate     {device:<5} hooks' median per step {out['hooks_us_with_gate']:.1f} us with the gate, "
        f"{out['hooks_us_without_gate']:.1f} us without: +{out['gate_us_per_step']:.1f} us; the gate's own work "
        f"{out['gate_inside_us']:.1f} us (median)"
    )
    return out


def time_inside(make: Any, device: str, steps: int, warmup: int) -> dict[str, float]:
    """Inside a guarded run: the policy's time per value (the first value of each checked batch apart: it meets
    caches the training step has cooled) and the time one snapshot takes."""
    guard = LRGuard()
    observe, process, take = guard.policy.observe, guard._process, SnapshotStore.take
    first: list[float] = []
    others: list[float] = []
    snapshots: list[float] = []
    position = [0]

    def timed_process(trainer: Any, values: Any) -> None:
        position[0] = 0
        process(trainer, values)

    def timed_observe(step: int, value: float) -> Any:
        start = time.perf_counter()
        intents = observe(step, value)
        if step >= warmup:
            (others if position[0] else first).append(time.perf_counter() - start)
        position[0] += 1
        return intents

    def timed_take(store: SnapshotStore, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        taken = take(store, *args, **kwargs)
        snapshots.append(time.perf_counter() - start)
        return taken

    guard.policy.observe, guard._process = timed_observe, timed_process  # type: ignore[method-assign,assignment]
    SnapshotStore.take = timed_take  # type: ignore[method-assign]
    try:
        fit(make, [guard], steps, device)
    finally:
        SnapshotStore.take = take  # type: ignore[method-assign]
    return {
        "first_value_us": 1e6 * statistics.median(first),
        "other_values_us": 1e6 * statistics.median(others),
        "snapshot_us": 1e6 * statistics.median(snapshots[1:]),  # the first allocates its buffers
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="steps per run (tiny and small models)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per model and callback")
    parser.add_argument("--gpt", action="store_true", help="also the ~85M GPT-style model")
    parser.add_argument(
        "--gpt-steps",
        type=int,
        default=None,
        help="steps per GPT run (default 16 on CPU, hooks timed only; 400 on a GPU)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed for comparable runs)")
    parser.add_argument(
        "--check-every", type=int, default=None, help="the guard's check_every_n_steps (default: its default, 8)"
    )
    parser.add_argument(
        "--parts", action="store_true", help="also time the tiny model's hooks with parts of the guard switched off"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for logger in ("pytorch_lightning", "lightning", "lightning.pytorch", "lr_guard"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    kwargs = {} if args.check_every is None else {"check_every_n_steps": args.check_every}
    results: dict[str, Any] = {}
    for device in devices:
        results[f"tiny_{device}"] = measure("tiny", TinyMLP, device, args.steps, args.repeats, kwargs)
        results[f"tiny_{device}_gate"] = measure_gate(TinyMLP, device, args.steps, args.repeats)
        if args.parts:
            results[f"tiny_{device}_parts"] = measure_parts(TinyMLP, device, args.steps, args.repeats)
        if device == "cpu":  # a step with some arithmetic in it: what the guard costs a small real model
            results["small_cpu"] = measure("small", SmallMLP, device, args.steps, args.repeats, kwargs)
        if args.gpt:
            batch, seq = (2, 64) if device == "cpu" else (32, 128)
            steps = args.gpt_steps or (16 if device == "cpu" else 400)
            params = sum(p.numel() for p in GPT(batch, seq).parameters())
            print(f"GPT-style model: {params / 1e6:.1f}M parameters, batch {batch}x{seq} on {device}")
            # on CPU a step takes over a second: the hooks are timed, but no wall clock could resolve them
            results[f"gpt85m_{device}"] = measure(
                "gpt85m",
                lambda b=batch, s=seq: GPT(b, s),
                device,
                steps,
                max(2, args.repeats - 1),
                kwargs,
                wall_clock=device != "cpu",
            )
    summary: dict[str, Any] = {
        "cpu_overhead_pct": round(results["tiny_cpu"]["overhead_pct"], 3),
        "cpu_overhead_median_pct": round(results["tiny_cpu"]["overhead_median_pct"], 3),
        "guard_us_per_step": round(results["tiny_cpu"]["guard_us_per_step"], 2),
        "gate_us_per_step": round(results["tiny_cpu_gate"]["gate_us_per_step"], 2),
    }
    if "tiny_cuda" in results:
        key = "gpt85m_cuda" if "gpt85m_cuda" in results else "tiny_cuda"
        summary["gpu_overhead_pct"] = round(results[key]["overhead_pct"], 3)
        summary["gpu_syncs_per_step"] = round(results[key]["syncs_per_step"], 3)
    for name, figures in results.items():
        summary[name] = {k: round(v, 4) if isinstance(v, float) and math.isfinite(v) else v for k, v in figures.items()}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
