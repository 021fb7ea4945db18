"""Each rank's own shard of a sharded model's state, read and written in place: the :class:`StateIO` for FSDP2.

Under torch's ``fully_shard`` (FSDP2, and tensor parallelism on top of it) every parameter is a ``DTensor``:
``model.state_dict()`` and ``optimizer.state_dict()`` hold ``DTensor`` s whose local tensors are this rank's
shards and share their storage with the live parameters and optimizer state. :class:`ShardedStateIO` hands
snapshots those local tensors -- a snapshot then holds this rank's shard only, its size is what the rank holds,
and it works with any storage (host memory, beside the weights, disk) -- and writes them back into the live
shards in place. No tensor is gathered and nothing is sent between ranks: every rank snapshots and restores its
own shard at the same step, since every rank takes the same decisions. Buffers, which ``fully_shard`` does not
shard, are copied whole, as each rank holds them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lr_guard.actions.snapshot import map_tree
from lr_guard.actions.state_io import StateIO

__all__ = ["SHARDED_STATE", "ShardedStateIO", "is_sharded"]


def _local(tensor: Any) -> Any:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def is_sharded(model: nn.Module) -> bool:
    """Whether any of the model's parameters is a ``DTensor`` (sharded by ``fully_shard`` or tensor parallelism)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


class ShardedStateIO(StateIO):
    """Reads and writes this rank's local shards of model and optimizer state (no gather, no collective)."""

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's parameters and buffers by name: each parameter's local shard (a view of the live shard)."""
        return {name: _local(value) for name, value in model.state_dict().items()}

    def load_model_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Copy each saved shard into the live one, in place; the keys must be the model's own."""
        live = model.state_dict()
        if set(live) != set(state):
            missing, unexpected = sorted(set(live) - set(state)), sorted(set(state) - set(live))
            raise RuntimeError(f"sharded state does not match the model: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for name, value in live.items():
                _local(value).copy_(state[name])

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state with every ``DTensor`` replaced by its local shard (views of the live state)."""
        return map_tree(optimizer.state_dict(), lambda t, _: _local(t))

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        return _local(tensor)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a whole saved state (used when its structure differs from the live one's, e.g. a snapshot taken
        before the optimizer's first step): each saved shard of a parameter's state is wrapped back into a
        ``DTensor`` laid out like that parameter, locally (no communication), and handed to ``load_state_dict``."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        ids = [i for group in state.get("param_groups", []) for i in group["params"]]
        by_id = dict(zip(ids, params, strict=False))
        entries = {}
        for i, entry in state.get("state", {}).items():
            param = by_id.get(i)
            entries[i] = {k: _like(v, param) for k, v in entry.items()}
        optimizer.load_state_dict({**state, "state": entries})


def _like(value: Any, param: Any) -> Any:
    """A saved shard of a parameter's state as a ``DTensor`` laid out like the parameter (a scalar such as Adam's
    ``step`` stays as it is)."""
    if not isinstance(param, DTensor) or not isinstance(value, torch.Tensor):
        return value
    if tuple(value.shape) != tuple(param.to_local().shape):
        return value
    return DTensor.from_local(
        value, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


SHARDED_STATE = ShardedStateIO()
