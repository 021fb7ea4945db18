"""Snapshots of a training state and in-place restore: weights, buffers, optimizers, schedulers, AMP, RNG.

A :class:`Snapshot` holds copies on the host (CPU) by default, so it costs no accelerator memory; ``device="same"``
keeps them beside the originals (faster, doubles the memory held). Restoring writes into the existing tensors
(``load_state_dict`` copies in place), so the optimizer's references to the parameters stay valid, and it hands
copies to ``load_state_dict`` -- torch's optimizer keeps the tensors it is given, and a snapshot must survive
being restored twice.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["Snapshot", "capture_rng", "restore_rng", "take_snapshot"]


def _copy_tree(obj: Any, device: str | None) -> Any:
    """Deep copy of a state tree; tensors are detached and copied (to ``device`` when given)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return t.to(device, copy=True) if device is not None else t.clone()
    if isinstance(obj, dict):
        return {k: _copy_tree(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy_tree(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_copy_tree(v, device) for v in obj)
    return copy.deepcopy(obj)


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def capture_rng() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's random generators (CUDA's too, where initialised)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Snapshot:
    """A training state at one step. Build it with :func:`take_snapshot`; apply it with :meth:`restore`."""

    step: int
    model: dict[str, torch.Tensor]
    optimizers: list[dict[str, Any]]
    schedulers: list[dict[str, Any]]
    precision: dict[str, Any] | None
    rng: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes held by the snapshot's tensors."""
        return _nbytes(self.model) + _nbytes(self.optimizers) + _nbytes(self.precision)

    def restore(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        schedulers: Sequence[Any],
        precision: Any | None = None,
        restore_rng_state: bool = True,
    ) -> None:
        """Write this state back into the live objects, in place."""
        if len(optimizers) != len(self.optimizers) or len(schedulers) != len(self.schedulers):
            raise ValueError(
                f"snapshot of step {self.step} has {len(self.optimizers)} optimizer(s) and "
                f"{len(self.schedulers)} scheduler(s); got {len(optimizers)} and {len(schedulers)}"
            )
        with torch.no_grad():
            model.load_state_dict(self.model, strict=True)
        for optimizer, state in zip(optimizers, self.optimizers, strict=True):
            optimizer.load_state_dict(_copy_tree(state, None))
        for scheduler, state in zip(schedulers, self.schedulers, strict=True):
            scheduler.load_state_dict(copy.deepcopy(state))
        if precision is not None and self.precision is not None:
            precision.load_state_dict(_copy_tree(self.precision, None))
        if restore_rng_state:
            restore_rng(self.rng)


def take_snapshot(
    step: int,
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[Any],
    precision: Any | None = None,
    extra: dict[str, Any] | None = None,
    device: str = "cpu",
) -> Snapshot:
    """Copy the full training state. ``device="cpu"`` (default) or ``"same"`` (beside the originals)."""
    target = None if device == "same" else device
    precision_state = precision.state_dict() if precision is not None else None
    return Snapshot(
        step=step,
        model=_copy_tree(model.state_dict(), target),
        optimizers=[_copy_tree(o.state_dict(), target) for o in optimizers],
        schedulers=[copy.deepcopy(s.state_dict()) for s in schedulers],
        precision=_copy_tree(precision_state, target) if precision_state else None,
        rng=capture_rng(),
        extra=copy.deepcopy(extra) if extra else {},
    )
