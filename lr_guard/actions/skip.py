"""Skip an optimizer update without touching the weights or the optimizer's state."""

from __future__ import annotations

from torch.optim import Optimizer

__all__ = ["drop_gradients"]


def drop_gradients(optimizer: Optimizer) -> None:
    """Set every parameter's ``.grad`` to ``None``: torch's optimizers then leave the parameter and its state
    (moments, step counts) untouched in the coming ``step()``. Called just before the step, this discards the
    batch's update (the forward and backward pass have already run; their result is thrown away)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None
