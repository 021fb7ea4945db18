"""Which Lightning strategies the guard serves, and how their model and optimizer state is read and written.

Single-device and DDP strategies: every rank holds the whole state (:data:`~lr_guard.actions.state_io.FULL_STATE`).
``ModelParallelStrategy`` with the model sharded by ``fully_shard`` (FSDP2) in ``configure_model``: each rank
snapshots and restores its own shards (:data:`~lr_guard.actions.sharded_state_io.SHARDED_STATE`). Refused, with
what to use instead: ``FSDPStrategy`` (FSDP1) and ``DeepSpeedStrategy``, and ``ModelParallelStrategy`` with no
sharded parameter. Strategies are recognised by class name, so both Lightning namespaces are covered.
"""

from __future__ import annotations

from typing import Any

from lr_guard.actions.state_io import FULL_STATE, StateIO

__all__ = ["check_strategy", "state_io_for"]

_INSTEAD = (
    "Supported: single-device and DDP strategies (ddp, ddp_spawn, ...), and ModelParallelStrategy with the model "
    "sharded by torch's fully_shard (FSDP2) in configure_model"
)
_REFUSED = {
    "FSDPStrategy": (
        "its state_dict() gathers the full model on every rank, its local shards are flat parameters, and "
        "Lightning runs it on CUDA only, so snapshots of its shards have not been tested. Use "
        "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) and apply fully_shard in "
        "configure_model (FSDP2): each rank's shard is then snapshotted and restored without a gather"
    ),
    "DeepSpeedStrategy": (
        "DeepSpeed's engine owns the optimizer step, the ZeRO partitions of the optimizer state and its own loss "
        "scaler, so the guard can neither snapshot nor restore them in place, nor skip an update. Use "
        "ModelParallelStrategy with fully_shard in configure_model (FSDP2), or DDP"
    ),
}


def _names(strategy: Any) -> set[str]:
    return {cls.__name__ for cls in type(strategy).__mro__}


def check_strategy(trainer: Any, owner: str) -> None:
    """Refuse, at ``setup``, a strategy the guard cannot serve, saying why and what to use instead."""
    strategy = trainer.strategy
    for name, why in _REFUSED.items():
        if name in _names(strategy):
            raise ValueError(f"{owner} does not support the {type(strategy).__name__} strategy: {why}. {_INSTEAD}")


def state_io_for(trainer: Any, module: Any, owner: str) -> StateIO:
    """How snapshots read and write this run's state, once the strategy has set the model up (``configure_model``
    has run): each rank's own shards when the parameters are sharded (``DTensor`` s), else the full state. A
    ``ModelParallelStrategy`` whose model has no sharded parameter is refused: nothing keeps its ranks' weights
    in step, so one decision on every rank would not act on one model."""
    from lr_guard.actions.sharded_state_io import SHARDED_STATE, is_sharded

    if is_sharded(module):
        return SHARDED_STATE
    strategy = trainer.strategy
    if "ModelParallelStrategy" not in _names(strategy):
        return FULL_STATE
    raise ValueError(
        f"{owner} under {type(strategy).__name__} needs a sharded model: none of its parameters is a DTensor, so "
        "nothing keeps the ranks' weights in step. Apply torch's fully_shard (FSDP2) to the model in "
        "configure_model, e.g. fully_shard(self.model, mesh=self.device_mesh['data_parallel']). " + _INSTEAD
    )
