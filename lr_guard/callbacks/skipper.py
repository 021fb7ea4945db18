"""Skipping an optimizer update on a live run, when the policy says so: before the step, the gradients are
dropped and the buffers the batch's forward pass changed (BatchNorm statistics) are put back."""

from __future__ import annotations

from typing import Any

import torch

from lr_guard.actions import drop_gradients, restore_buffers, save_buffers
from lr_guard.callbacks.feed import ValueFeed
from lr_guard.policy import GuardPolicy

__all__ = ["UpdateSkipper"]


class UpdateSkipper:
    """Asks the policy, before an optimizer step, whether its update is to be skipped, and skips it. The guard
    calls it only while a skip may come (skips left after a rollback, or ``skip_spikes``).

    With ``skip_spikes`` the step's loss is summed over its micro-batches as they are backpropagated and read
    before the step (one host sync per step; under DDP the mean over ranks, so every rank skips alike).
    """

    def __init__(self, policy: GuardPolicy, feed: ValueFeed) -> None:
        self.policy = policy
        self.feed = feed
        self.reset()

    def reset(self) -> None:
        self._buffers: dict[str, torch.Tensor] | None = None
        self._step_loss: torch.Tensor | None = None

    def batch_start(self, module: Any) -> None:
        """Keep the buffers while a skip may come (after a rollback, or with ``skip_spikes``)."""
        if self._buffers is None:
            self._buffers = save_buffers(module)

    def backward(self, loss: torch.Tensor) -> None:
        """With ``skip_spikes``: sum the step's loss over its micro-batches."""
        loss = loss.detach()
        self._step_loss = loss if self._step_loss is None else self._step_loss + loss

    def before_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
        step_loss, self._step_loss = self._step_loss, None
        read = None
        if step_loss is not None:
            read = lambda: float(self.feed.agreed(trainer, step_loss))  # noqa: E731
        if self.policy.should_skip(trainer.global_step, read):
            drop_gradients(optimizer)
            if self._buffers is not None:
                restore_buffers(module, self._buffers)
        self._buffers = None
