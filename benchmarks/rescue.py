"""Rescue benchmark: lr_guard against what users would otherwise use, on the faults they hit.

    python benchmarks/rescue.py                 # 13 scenarios x 7 methods x 3 seeds (~10 minutes on 2 cores)
    python benchmarks/rescue.py --seeds 1 --steps 300 --scenarios samples_nan --methods none lr_guard lr_guard_no_gate

Task: an MLP on scikit-learn's bundled digits (the demo's model), 600 steps, validation at the end.
Scenarios: ``healthy`` (Adam 3e-3, cosine), ``lr_too_high`` (Adam 0.5), ``warmup_too_high`` (linear warm-up to
Adam 0.5, then cosine), ``corrupt_batch`` (one batch x1e6 at step 300, SGD 0.1), ``nan_inputs`` (one NaN batch at
step 300, Adam 3e-3), ``sgd_divergence`` (SGD 1.0, momentum 0.9), ``noisy_plateau`` (SGD 0.1 at a constant LR,
batch 8: the loss sits on a noise floor that a lower LR would go below). Bad samples met again every epoch (fixed
samples of the training set, shuffled in; the healthy run is their clean run): ``samples_nan`` (20 samples with
NaN inputs), ``samples_x1e4`` (4 samples with inputs x1e4), ``samples_wrong_labels`` (60 samples with another
class as label). A small byte-level language model (one transformer block on stdlib docstrings, AdamW, warm-up
then cosine): ``lm_healthy`` and ``lm_corrupt_batch`` (every label of the batch at step 300 replaced by one byte).
Methods: no guard; Lightning's ``EarlyStopping(monitor="val_loss", check_finite=True)`` (validation every 50
steps); torch's ``ReduceLROnPlateau`` on ``val_loss`` (factor 0.5, patience 2, validation every 50 steps), added
beside the scenario's scheduler as a user would; ``zclip`` (its ZClip with defaults, if the package is installed;
its column is skipped otherwise); ``LRGuard()`` with defaults (the update gate on, skip mode);
``LRGuard(gate=False)`` (the update gate off, as the guard was before the gate became its default) and
``LRGuard(gate=UpdateGate(mode="clip"))``; ``LRGuard(lr_search=True)`` (the LR search: its in-run sweep, and
trials where the sweep found no threshold; the steps it threw away are printed per run) and
``LRGuard(lr_search=True, lr_search_sweep_steps=0)`` (its trials alone, ``lr_guard_trials``). The peak-LR sweep:
``mlp_peak_x<m>`` (the MLP with a linear warm-up and a cosine decay to a peak of m x its tuned Adam peak) and
``lm_peak_x<m>`` (the language model at m x its tuned AdamW peak); the tuned peaks (``TUNED_PEAK``) are the best
of the grid ``mlp_grid_x<k>`` / ``lm_grid_x<k>`` (the peak at k x 3e-3, no guard), which is run on its own.

Figure: final validation loss (a run whose weights are not finite counts as infinite) and wall time; mean and
standard deviation over seeds. The last line is one JSON object ``{scenario: {method: mean_final_val_loss}}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping
from torch import nn

from lr_guard import LRGuard
from lr_guard.actions.gate import UpdateGate

_spec = importlib.util.spec_from_file_location("lr_guard_demo", Path(__file__).parent.parent / "examples" / "demo.py")
assert _spec is not None and _spec.loader is not None
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)

SCENARIOS: dict[str, dict[str, Any]] = {
    "healthy": {},
    "lr_too_high": {"lr": 0.5},
    "warmup_too_high": {"lr": 0.5, "schedule": "warmup_cosine"},
    "corrupt_batch": {"optimizer": "sgd", "lr": 0.1, "poison_step": 300, "fault": "huge"},
    "nan_inputs": {"poison_step": 300, "fault": "nan"},
    "sgd_divergence": {"optimizer": "sgd", "lr": 1.0},
    "noisy_plateau": {"optimizer": "sgd", "lr": 0.1, "schedule": "constant", "batch_size": 8},
    # bad samples met again every epoch (fixed samples of the training set, shuffled in)
    "samples_nan": {"corrupt": ("nan", 20)},
    "samples_x1e4": {"corrupt": ("scale", 4)},
    "samples_wrong_labels": {"corrupt": ("labels", 60)},
    # a small byte-level language model (warm-up + cosine, AdamW)
    "lm_healthy": {"model": "lm"},
    "lm_corrupt_batch": {"model": "lm", "poison_step": 0},
}
# the grid the tuned peaks are read from: the peak LR at these multiples of 3e-3, no guard
TUNE_GRID = (1, 2, 3, 5, 7, 10)
TUNE_BASE = 3e-3
# the tuned peak LR of each task: the best mean final validation loss of that grid (3 seeds, 600 steps, no guard;
# `python benchmarks/rescue.py --scenarios mlp_grid_x1 ... lm_grid_x10 --methods none`, numbers in the README)
TUNED_PEAK = {"mlp": 5 * TUNE_BASE, "lm": 5 * TUNE_BASE}
# the peak-LR sweep: the peak of the schedule at a multiple of the task's tuned peak (MLP: Adam with a linear
# warm-up and a cosine decay; LM: AdamW, warm-up + cosine)
PEAK_MULTIPLES = (0.1, 0.3, 1, 3, 10, 30)


def _peak(model: str, lr: float) -> dict[str, Any]:
    return {"model": "lm", "lr": lr} if model == "lm" else {"lr": lr, "schedule": "warmup_cosine"}


for _model in ("mlp", "lm"):
    SCENARIOS.update({f"{_model}_grid_x{k:g}": _peak(_model, k * TUNE_BASE) for k in TUNE_GRID})
    SCENARIOS.update({f"{_model}_peak_x{k:g}": _peak(_model, k * TUNED_PEAK[_model]) for k in PEAK_MULTIPLES})


class CorruptedDigits(demo.DigitsMLP):
    """The digits MLP with fixed training samples corrupted (met again each epoch): ``("nan", n)`` NaN pixels,
    ``("scale", n)`` pixels x 1e4, ``("labels", n)`` labels replaced by another class."""

    def __init__(self, poison_step: int | None, corrupt: tuple[str, int], seed: int = 0, **kwargs: Any) -> None:
        super().__init__(poison_step, seed=seed, **kwargs)
        kind, count = corrupt
        x, y = (t.clone() for t in self.train_set.tensors)
        which = torch.randperm(len(y), generator=torch.Generator().manual_seed(100 + seed))[:count]
        if kind == "nan":
            x[which] = math.nan
        elif kind == "scale":
            x[which] *= 1e4
        else:
            y[which] = (
                y[which] + 1 + torch.randint(0, 9, (count,), generator=torch.Generator().manual_seed(seed))
            ) % 10
        self.train_set = torch.utils.data.TensorDataset(x, y)


def corpus(size: int = 400_000) -> torch.Tensor:
    """Text that ships with Python -- the docstrings of a fixed list of stdlib modules and of their public
    functions and classes (no download) -- as bytes."""
    import importlib
    import inspect

    names = (
        "argparse collections csv datetime decimal email fractions functools heapq inspect itertools json logging "
        "math pathlib pickle random re shutil statistics string subprocess tarfile textwrap threading typing "
        "unittest urllib.parse uuid zipfile"
    ).split()
    parts = []
    for name in names:
        module = importlib.import_module(name)
        parts.append(module.__doc__ or "")
        for _, member in sorted(vars(module).items()):
            if (inspect.isfunction(member) or inspect.isclass(member)) and isinstance(member.__doc__, str):
                parts.append(member.__doc__)
    text = "\n".join(parts).encode("ascii", "replace")[:size]
    return torch.tensor(list(text), dtype=torch.long)


class TinyLM(pl.LightningModule):
    """A one-block causal transformer on bytes, AdamW with a linear warm-up and a cosine decay. ``poison_step``:
    every label of that step's batch is replaced by one byte (a corrupt shard)."""

    def __init__(self, poison_step: int | None, seed: int = 0, lr: float = 3e-3, seq: int = 32) -> None:
        super().__init__()
        torch.manual_seed(seed)
        width = 64
        self.embed, self.pos = nn.Embedding(256, width), nn.Parameter(torch.zeros(seq, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.block = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(width, 256)
        self.poison_step, self.lr, self.seq, self.seed = poison_step, lr, seq, seed
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq - 1), persistent=False)
        data = corpus()
        n = (len(data) // seq) * seq
        windows = data[:n].view(-1, seq)
        self.train_windows, self.val_windows = windows[: int(0.9 * len(windows))], windows[int(0.9 * len(windows)) :]
        self.extra_schedulers: list[Any] = []

    def _loss(self, tokens: torch.Tensor, corrupt: bool = False) -> torch.Tensor:
        h = self.block(self.embed(tokens[:, :-1]) + self.pos[: self.seq - 1], mask=self.mask, is_causal=True)
        targets = torch.full_like(tokens[:, 1:], ord("e")) if corrupt else tokens[:, 1:]
        return nn.functional.cross_entropy(self.head(h).flatten(0, 1), targets.flatten())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch[0], corrupt=self.global_step == self.poison_step)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch[0]))

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        data = torch.utils.data.TensorDataset(self.train_windows)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, generator=generator)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.val_windows), batch_size=256)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        steps, warmup = self.trainer.max_steps, self.trainer.max_steps // 10
        S = torch.optim.lr_scheduler
        schedule = S.SequentialLR(
            optimizer,
            [S.LinearLR(optimizer, 0.01, 1.0, warmup), S.CosineAnnealingLR(optimizer, steps - warmup)],
            [warmup],
        )
        configs = [{"scheduler": schedule, "interval": "step"}]
        configs += [{"scheduler": factory(optimizer), **config} for factory, config in self.extra_schedulers]
        return [optimizer], configs


class ZClipCallback(pl.Callback):
    """zclip's own Lightning callback, for the pytorch_lightning namespace (zclip ships one for lightning's)."""

    def __init__(self) -> None:
        from zclip import ZClip

        self.zclip = ZClip()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.zclip.step(pl_module)


class ScheduleFreeModes(pl.Callback):
    """Schedule-Free optimizers train at one point and are evaluated at another: ``optimizer.train()`` before
    training steps, ``optimizer.eval()`` before every validation and once training ends (the weights left in the
    model are then the averaged ones, which the final validation reads)."""

    def _mode(self, trainer: Any, mode: str) -> None:
        for optimizer in trainer.optimizers:
            getattr(optimizer, mode)()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._mode(trainer, "train")

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn == "fit":  # a validation inside fit (a later trainer.validate finds eval set)
            self._mode(trainer, "eval")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn == "fit":
            self._mode(trainer, "train")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._mode(trainer, "eval")


# LR-free optimizers, each at its defaults, replacing the model's optimizer and scheduler
LR_FREE = {"prodigy": ("prodigyopt", "Prodigy"), "schedule_free": ("schedulefree", "AdamWScheduleFree")}


def _use_lr_free(model: Any, method: str) -> None:
    package, name = LR_FREE[method]
    cls = getattr(importlib.import_module(package), name)
    model.configure_optimizers = lambda: cls(model.parameters())


def _installed(method: str) -> bool:
    package = "zclip" if method == "zclip" else LR_FREE[method][0] if method in LR_FREE else None
    return package is None or importlib.util.find_spec(package) is not None


METHODS = [
    "none",
    "early_stopping",
    "reduce_on_plateau",
    "zclip",
    "lr_guard",
    "lr_guard_no_gate",
    "lr_guard_gate_clip",
    "lr_guard_search",
    "lr_guard_trials",
    "prodigy",
    "schedule_free",
]


def _quiet() -> None:
    names = (
        "pytorch_lightning",
        "lightning",
        "lightning.pytorch",
        "lightning_fabric",
        "lightning_utilities",
        "lr_guard",
    )
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_trainer(root: str, steps: int, callbacks: list[Any] | None = None) -> pl.Trainer:
    """The benchmark's CPU Trainer: ``steps`` optimizer steps, validation every 50, nothing written but under
    ``root``."""
    return pl.Trainer(
        default_root_dir=root,
        max_steps=steps,
        callbacks=callbacks or [],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        val_check_interval=50,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )


def run(scenario: str, method: str, seed: int, steps: int, sweep_steps: int | None = None) -> dict[str, float]:
    """One run; ``sweep_steps``: ``lr_search_sweep_steps`` of ``lr_guard_search`` (``None``: its default)."""
    kwargs = dict(SCENARIOS[scenario])
    poison = steps // 2 if kwargs.pop("poison_step", None) is not None else None  # the fault at mid-run
    pl.seed_everything(seed, verbose=False)
    kind = kwargs.pop("model", "mlp")
    model: Any
    if kind == "lm":
        model = TinyLM(poison, seed=seed, **kwargs)
    elif "corrupt" in kwargs:
        model = CorruptedDigits(poison, seed=seed, **kwargs)
    else:
        model = demo.DigitsMLP(poison, seed=seed, **kwargs)
    callbacks: list[Any] = []
    if method == "early_stopping":
        callbacks.append(EarlyStopping(monitor="val_loss", check_finite=True, patience=3))
    elif method == "reduce_on_plateau":
        model.extra_schedulers.append(
            (
                lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=2),
                {"monitor": "val_loss", "interval": "step", "frequency": 50},
            )
        )
    elif method == "zclip":
        callbacks.append(ZClipCallback())
    elif method == "lr_guard":
        callbacks.append(LRGuard())
    elif method == "lr_guard_no_gate":
        callbacks.append(LRGuard(gate=False))
    elif method == "lr_guard_gate_clip":
        callbacks.append(LRGuard(gate=UpdateGate(mode="clip")))
    elif method == "lr_guard_search":
        sweep = {} if sweep_steps is None else {"lr_search_sweep_steps": sweep_steps}
        callbacks.append(LRGuard(lr_search=True, **sweep))
    elif method == "lr_guard_trials":  # the LR search's trials alone, with no range test first
        callbacks.append(LRGuard(lr_search=True, lr_search_sweep_steps=0))
    elif method in LR_FREE:
        _use_lr_free(model, method)
        if method == "schedule_free":
            callbacks.append(ScheduleFreeModes())
    _quiet()  # each time: a Lightning namespace imported lazily sets its logger's level as it loads
    # a guard that stops writes its last good state under the root: a temporary one, gone after the run
    with tempfile.TemporaryDirectory(prefix="lr_guard_rescue_") as root:
        trainer = quiet_trainer(root, steps, callbacks)
        start = time.perf_counter()
        trainer.fit(model)
        seconds = time.perf_counter() - start
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        val = trainer.validate(model, verbose=False)[0]["val_loss"] if finite else math.inf
    guard = next((c for c in callbacks if isinstance(c, LRGuard)), None)
    discarded = guard.counts.get("discarded_trial_steps", 0) if guard is not None else 0
    return {"val_loss": val if math.isfinite(val) else math.inf, "seconds": seconds, "discarded": discarded}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=600)
    default = [name for name in SCENARIOS if "_grid_" not in name]  # the grid is run on its own (`--scenarios`)
    parser.add_argument("--scenarios", nargs="+", default=default, choices=list(SCENARIOS))
    methods = [m for m in METHODS if m != "lr_guard_trials"]  # the trials alone: asked for by name
    parser.add_argument("--methods", nargs="+", default=methods, choices=METHODS)
    parser.add_argument(
        "--sweep-steps", type=int, default=None, help="lr_search_sweep_steps of lr_guard_search (default: its own)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    _quiet()
    methods = [m for m in args.methods if _installed(m)]
    for method in args.methods:
        if method not in methods:
            package = "zclip" if method == "zclip" else LR_FREE[method][0]
            print(f"{package} is not installed (pip install {package}): the {method} column is skipped")
    means: dict[str, dict[str, float]] = {}
    print(f"{'scenario':<17}" + "".join(f"{m:>24}" for m in methods))
    for scenario in args.scenarios:
        means[scenario] = {}
        cells, discarded = [], {}
        for method in methods:
            results = [run(scenario, method, seed, args.steps, args.sweep_steps) for seed in range(args.seeds)]
            losses = [r["val_loss"] for r in results]
            mean = statistics.mean(losses) if all(math.isfinite(x) for x in losses) else math.inf
            std = statistics.pstdev(losses) if math.isfinite(mean) else 0.0
            lost = sum(not math.isfinite(x) for x in losses)
            seconds = statistics.mean(r["seconds"] for r in results)
            means[scenario][method] = mean
            if method in ("lr_guard_search", "lr_guard_trials"):
                discarded[method] = [int(r["discarded"]) for r in results]
            text = f"{mean:.3f}±{std:.3f}" if math.isfinite(mean) else f"lost {lost}/{len(losses)}"
            cells.append(f"{text} {seconds:4.1f}s")
        print(f"{scenario:<17}" + "".join(f"{c:>24}" for c in cells), flush=True)
        for method, steps in discarded.items():
            print(f"  {method}: discarded steps (sweep and trials) per run {steps} (of {args.steps})", flush=True)
    print(json.dumps(means))
    return means


if __name__ == "__main__":
    main()
