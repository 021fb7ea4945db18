"""Small LightningModules for tests, examples and benchmarks (imported lazily through ``lr_guard.testing``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["ScriptedLossModule", "TinyRegressionModule", "regression_data"]


def regression_data(n: int = 256, dim: int = 8, seed: int = 0, noise: float = 0.1) -> TensorDataset:
    """A seeded linear-regression data set with a little noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g)
    y = x @ w + noise * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


class _Base(pl.LightningModule):
    def __init__(
        self,
        lr: float,
        optimizer: str,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None,
        interval: str,
        batch_size: int,
        n: int,
        seed: int,
        param_groups: int,
    ) -> None:
        super().__init__()
        self.lr, self.optimizer_name, self.scheduler_factory = lr, optimizer, scheduler
        self.interval, self.batch_size, self.data = interval, batch_size, regression_data(n=n, seed=seed)
        self.param_groups_count = param_groups

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=False)

    def configure_optimizers(self) -> Any:
        params = list(self.parameters())
        if self.param_groups_count == 2:
            groups: Any = [{"params": params[:1], "lr": self.lr}, {"params": params[1:], "lr": self.lr * 0.1}]
        else:
            groups = params
        cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[self.optimizer_name]
        kwargs: dict[str, Any] = {"lr": self.lr}
        if self.optimizer_name == "sgd":
            kwargs["momentum"] = 0.9
        optimizer = cls(groups, **kwargs)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "train_loss"
        return {"optimizer": optimizer, "lr_scheduler": config}


class ScriptedLossModule(_Base):
    """A real model with real gradients whose training loss *equals* a given sequence.

    The loss at optimizer step ``t`` (``self.global_step``) is ``script[t] * q / q.detach()``, with ``q`` the
    model's mean-squared error on the batch: its value is exactly ``script[t]`` and its gradient is ``script[t]``
    times the relative gradient of ``q``, so a NaN or inf in the script poisons the gradients and the weights, as
    a real bad batch would. Past the end of the script the last value repeats. The model has a BatchNorm layer,
    so it has buffers.
    """

    def __init__(
        self,
        script: Sequence[float],
        lr: float = 0.05,
        optimizer: str = "sgd",
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        interval: str = "step",
        batch_size: int = 16,
        n: int = 256,
        seed: int = 0,
        param_groups: int = 1,
    ) -> None:
        super().__init__(lr, optimizer, scheduler, interval, batch_size, n, seed, param_groups)
        self.script = [float(v) for v in script]
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))
        self.seen_losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        q = nn.functional.mse_loss(self.net(x), y) + 1e-3
        target = self.script[min(self.global_step, len(self.script) - 1)]
        loss = target * q / q.detach()
        self.log("train_loss", loss.detach(), on_step=True, prog_bar=False)
        return loss


class TinyRegressionModule(_Base):
    """A small MLP regressing seeded linear data: a real model whose loss really depends on the learning rate."""

    def __init__(
        self,
        lr: float = 0.05,
        optimizer: str = "sgd",
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        interval: str = "step",
        batch_size: int = 16,
        n: int = 256,
        seed: int = 0,
        param_groups: int = 1,
        poison_steps: Sequence[int] = (),
    ) -> None:
        super().__init__(lr, optimizer, scheduler, interval, batch_size, n, seed, param_groups)
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        self.poison_steps = set(poison_steps)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step in self.poison_steps:
            x = x * math.nan
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss.detach(), on_step=True)
        return loss

    @torch.no_grad()
    def full_loss(self) -> float:
        x, y = self.data.tensors
        return float(nn.functional.mse_loss(self.net(x), y))
