"""The seam between snapshots and the state they copy: how model and optimizer state are read and written.

Snapshots never call ``state_dict()`` or ``load_state_dict()`` on a model or an optimizer themselves; they go
through a :class:`StateIO`. The default, :data:`FULL_STATE`, reads each process's full state, which is right for
a single device and for DDP (every rank holds the whole model). A sharded strategy replaces it with one that
reads and writes each rank's own shard, without gathering the model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["FULL_STATE", "StateIO", "state_nbytes"]


class StateIO:
    """Reads and writes a process's model and optimizer state through their own ``state_dict`` methods."""

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's parameters and buffers by name (views of the live tensors: copy before they change)."""
        return model.state_dict()

    def buffer_names(self, model: nn.Module) -> set[str]:
        """The keys of :meth:`model_state` that are buffers (changed by the forward pass, not the optimizer)."""
        return {name for name, _ in model.named_buffers()}

    def load_model_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` into the model's own tensors, in place; every key must match."""
        with torch.no_grad():
            model.load_state_dict(state, strict=True)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """The part of a live tensor (a parameter, an optimizer's state) that this process holds and snapshots
        copy into: the tensor itself when every rank holds the whole state."""
        return tensor

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a whole optimizer state whose tensors the optimizer may keep (they must be its own)."""
        optimizer.load_state_dict(state)


FULL_STATE = StateIO()


def state_nbytes(model: nn.Module, optimizers: Any, state_io: StateIO = FULL_STATE) -> int:
    """Bytes of the tensors one snapshot of this model and these optimizers copies."""
    from lr_guard.actions.snapshot import tree_nbytes

    return tree_nbytes(state_io.model_state(model)) + sum(tree_nbytes(state_io.optimizer_state(o)) for o in optimizers)
