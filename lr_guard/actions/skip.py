"""Skip an optimizer update without touching the weights, the buffers or the optimizer's state."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import Optimizer

__all__ = ["drop_gradients", "restore_buffers", "save_buffers"]


def drop_gradients(optimizer: Optimizer) -> None:
    """Set every parameter's ``.grad`` to ``None``: torch's optimizers then leave the parameter and its state
    (moments, step counts) untouched in the coming ``step()``. Called just before the step, this discards the
    batch's update (the forward and backward pass have already run; their result is thrown away)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def save_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the module's floating-point and integer buffers (BatchNorm statistics, counters)."""
    return {name: buf.detach().clone() for name, buf in module.named_buffers()}


def restore_buffers(module: nn.Module, saved: dict[str, torch.Tensor], where: torch.Tensor | None = None) -> None:
    """Write buffers saved by :func:`save_buffers` back in place: a skipped batch's forward pass must not leave
    its statistics behind (a NaN batch would poison BatchNorm's running mean). ``where``: a 0-d bool tensor that
    decides on the device whether they are put back (nothing is read on the host)."""
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in saved:
                buf.copy_(saved[name] if where is None else torch.where(where, saved[name], buf))
