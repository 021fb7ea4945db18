"""Rescue benchmark: lr_guard against what users would otherwise use, on the faults they hit.

    python benchmarks/rescue.py                 # 7 scenarios x 5 methods x 3 seeds (~3 minutes on 2 cores)
    python benchmarks/rescue.py --seeds 1 --steps 300

Task: an MLP on scikit-learn's bundled digits (the demo's model), 600 steps, validation at the end.
Scenarios: ``healthy`` (Adam 3e-3, cosine), ``lr_too_high`` (Adam 0.5), ``warmup_too_high`` (linear warm-up to
Adam 0.5, then cosine), ``corrupt_batch`` (one batch x1e6 at step 300, SGD 0.1), ``nan_inputs`` (one NaN batch at
step 300, Adam 3e-3), ``sgd_divergence`` (SGD 1.0, momentum 0.9), ``noisy_plateau`` (SGD 0.1 at a constant LR,
batch 8: the loss sits on a noise floor that a lower LR would go below).
Methods: no guard; Lightning's ``EarlyStopping(monitor="val_loss", check_finite=True)`` (validation every 50
steps); torch's ``ReduceLROnPlateau`` on ``val_loss`` (factor 0.5, patience 2, validation every 50 steps), added
beside the scenario's scheduler as a user would; ``zclip`` (its ZClip with defaults, if the package is installed;
its column is skipped otherwise); ``LRGuard()`` with defaults.

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

from lr_guard import LRGuard

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
}


class ZClipCallback(pl.Callback):
    """zclip's own Lightning callback, for the pytorch_lightning namespace (zclip ships one for lightning's)."""

    def __init__(self) -> None:
        from zclip import ZClip

        self.zclip = ZClip()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.zclip.step(pl_module)


def _has_zclip() -> bool:
    return importlib.util.find_spec("zclip") is not None


METHODS = ["none", "early_stopping", "reduce_on_plateau", "zclip", "lr_guard"]


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


def run(scenario: str, method: str, seed: int, steps: int) -> dict[str, float]:
    kwargs = dict(SCENARIOS[scenario])
    poison = steps // 2 if kwargs.pop("poison_step", None) is not None else None  # the fault at mid-run
    pl.seed_everything(seed, verbose=False)
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
    _quiet()  # each time: a Lightning namespace imported lazily sets its logger's level as it loads
    # a guard that stops writes its last good state under the root: a temporary one, gone after the run
    with tempfile.TemporaryDirectory(prefix="lr_guard_rescue_") as root:
        trainer = pl.Trainer(
            default_root_dir=root,
            max_steps=steps,
            callbacks=callbacks,
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
        start = time.perf_counter()
        trainer.fit(model)
        seconds = time.perf_counter() - start
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        val = trainer.validate(model, verbose=False)[0]["val_loss"] if finite else math.inf
    return {"val_loss": val if math.isfinite(val) else math.inf, "seconds": seconds}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    _quiet()
    methods = [m for m in METHODS if m != "zclip" or _has_zclip()]
    if "zclip" not in methods:
        print("zclip is not installed (pip install zclip): its column is skipped")
    means: dict[str, dict[str, float]] = {}
    print(f"{'scenario':<17}" + "".join(f"{m:>24}" for m in methods))
    for scenario in args.scenarios:
        means[scenario] = {}
        cells = []
        for method in methods:
            results = [run(scenario, method, seed, args.steps) for seed in range(args.seeds)]
            losses = [r["val_loss"] for r in results]
            mean = statistics.mean(losses) if all(math.isfinite(x) for x in losses) else math.inf
            std = statistics.pstdev(losses) if math.isfinite(mean) else 0.0
            lost = sum(not math.isfinite(x) for x in losses)
            seconds = statistics.mean(r["seconds"] for r in results)
            means[scenario][method] = mean
            text = f"{mean:.3f}±{std:.3f}" if math.isfinite(mean) else f"lost {lost}/{len(losses)}"
            cells.append(f"{text} {seconds:4.1f}s")
        print(f"{scenario:<17}" + "".join(f"{c:>24}" for c in cells), flush=True)
    print(json.dumps(means))
    return means


if __name__ == "__main__":
    main()
