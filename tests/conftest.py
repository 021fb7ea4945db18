import pytest

from lr_guard.data import load_curve


@pytest.fixture
def curve():
    return load_curve


import tempfile  # noqa: E402
import warnings  # noqa: E402

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # one reduction order for every comparison in the suite


def load_benchmark(name):
    """The module ``benchmarks/<name>.py`` of this checkout (the benchmarks are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_trainer(callbacks=(), max_steps=60, trainer_class=pl.Trainer, **kwargs):
    """A quiet CPU Trainer for tests (``trainer_class=lightning.pytorch.Trainer`` for the other namespace)."""
    defaults = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        max_epochs=-1,
        default_root_dir=tempfile.mkdtemp(prefix="lr_guard_test_"),
    )
    defaults.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer_class(callbacks=list(callbacks), max_steps=max_steps, **defaults)


class LRRecorder(pl.Callback):
    """Records every param group's LR as the optimizer is about to use it, per global step."""

    def __init__(self):
        self.lrs = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs[trainer.global_step] = [g["lr"] for opt in trainer.optimizers for g in opt.param_groups]


@pytest.fixture(autouse=True)
def _quiet_lightning(caplog):
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    yield
