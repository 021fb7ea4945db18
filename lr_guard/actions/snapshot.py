"""Snapshots of a training state and in-place restore: weights, buffers, optimizers, schedulers, AMP, RNG.

A :class:`Snapshot` holds copies on the host (CPU) by default, so it costs no accelerator memory; ``device="same"``
keeps them beside the originals (faster, doubles the memory held). Restoring writes into the existing tensors
(``load_state_dict`` copies in place), so the optimizer's references to the parameters stay valid, and it hands
copies to ``load_state_dict`` -- torch's optimizer keeps the tensors it is given, and a snapshot must survive
being restored twice.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "Snapshot",
    "capture_rng",
    "precision_state",
    "restore_precision",
    "restore_rng",
    "take_snapshot",
    "tree_nbytes",
]


def _copy_tree(
    obj: Any,
    device: str | None,
    reuse: Any = None,
    non_blocking: bool = False,
    into: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Any:
    """Deep copy of a state tree; tensors are detached and copied (to ``device``, ``"cpu"`` or ``"cuda"``,
    when given).

    ``reuse`` is an earlier copy of a tree of the same structure: its tensors are written in place when shape,
    dtype and device match, so a snapshot taken every N steps allocates nothing after the first two. With
    ``into``, those in-place copies are not made but listed there as ``(destination, source)`` for one batched
    copy (:func:`_copy_all`). Copies of accelerator tensors to the host go into pinned memory, so they can run
    without blocking.
    """
    cls = type(obj)
    if cls in _IMMUTABLE:  # most leaves of an optimizer's state (its hyperparameters): nothing to copy
        return obj
    if cls is dict or isinstance(obj, dict):
        old_items = reuse if isinstance(reuse, dict) else _NOTHING
        return {
            k: v if type(v) in _IMMUTABLE else _copy_tree(v, device, old_items.get(k), non_blocking, into)
            for k, v in obj.items()
        }
    if isinstance(obj, torch.Tensor):
        t = obj.detach() if obj.requires_grad else obj  # a state_dict's tensors are detached already
        if (
            isinstance(reuse, torch.Tensor)
            and reuse.shape == t.shape
            and reuse.dtype == t.dtype
            and (
                reuse.is_cpu
                if device == "cpu"
                else reuse.device == t.device
                if device is None
                else reuse.device.type == device
            )
        ):
            if into is not None:
                into.append((reuse, t))
            else:
                reuse.copy_(t, non_blocking=non_blocking)
            return reuse
        if device is None:
            return t.clone()
        if t.is_cuda and torch.device(device).type == "cpu":
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            out.copy_(t, non_blocking=non_blocking)
            return out
        return t.to(device, copy=True)
    if isinstance(obj, (list, tuple)):
        if all(type(v) in _IMMUTABLE for v in obj):  # e.g. a param group's parameter ids
            return list(obj) if isinstance(obj, list) else obj
        old_seq = reuse if isinstance(reuse, (list, tuple)) and len(reuse) == len(obj) else [None] * len(obj)
        items = [_copy_tree(v, device, r, non_blocking, into) for v, r in zip(obj, old_seq, strict=True)]
        return items if isinstance(obj, list) else tuple(items)
    return copy.deepcopy(obj)


_IMMUTABLE = frozenset((int, float, bool, str, type(None), torch.dtype, torch.device))
_NOTHING: dict[Any, Any] = {}


def _copy_all(pairs: list[tuple[torch.Tensor, torch.Tensor]], non_blocking: bool = False) -> None:
    """Make the in-place copies :func:`_copy_tree` listed: on the host, one batched call instead of one call per
    tensor; with an accelerator involved, one ``copy_`` each (each is one asynchronous transfer anyway)."""
    if not pairs:
        return
    if non_blocking or any(d.is_cuda or s.is_cuda for d, s in pairs):
        for destination, source in pairs:
            destination.copy_(source, non_blocking=non_blocking)
        return
    destinations, sources = zip(*pairs, strict=True)
    torch._foreach_copy_(list(destinations), list(sources))


def tree_nbytes(obj: Any) -> int:
    """Bytes held by the tensors of a state tree (nested dicts, lists and tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tree_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tree_nbytes(v) for v in obj)
    return 0


def _tensor_meta(value: Any) -> tuple[tuple[int, ...], torch.dtype] | None:
    return (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else None


def restore_optimizer_in_place(
    optimizer: torch.optim.Optimizer,
    saved: dict[str, Any],
    tensor_meta: Callable[[Any], tuple[tuple[int, ...], torch.dtype] | None] = _tensor_meta,
    load: Callable[[Any], torch.Tensor] = lambda value: value,
) -> bool:
    """Copy a saved optimizer state into the optimizer's own state tensors, one tensor at a time (no allocation).

    ``tensor_meta(value)`` says whether a saved value is a tensor (its shape and dtype) and ``load(value)`` gives
    it, so the saved tensors may be in memory (the defaults) or still on disk. Returns ``False`` (nothing changed)
    unless the structure matches exactly -- same groups, same parameters with state, same keys, shapes and dtypes,
    checked before anything is read or written -- and the caller then falls back to ``load_state_dict``.
    """
    groups, saved_groups = optimizer.param_groups, saved.get("param_groups", [])
    if len(groups) != len(saved_groups) or any(
        len(g["params"]) != len(sg["params"]) for g, sg in zip(groups, saved_groups, strict=True)
    ):
        return False
    ids = [i for sg in saved_groups for i in sg["params"]]
    by_id = dict(zip(ids, [p for g in groups for p in g["params"]], strict=True))
    saved_state = saved.get("state", {})
    if set(saved_state) != {i for i, p in by_id.items() if optimizer.state.get(p)}:
        return False
    for i, entry in saved_state.items():
        live = optimizer.state[by_id[i]]
        if set(live) != set(entry):
            return False
        for key, value in entry.items():
            meta, current = tensor_meta(value), live[key]
            if (meta is None) == isinstance(current, torch.Tensor):
                return False
            if meta is not None and meta != (tuple(current.shape), current.dtype):
                return False
    with torch.no_grad():
        for i, entry in saved_state.items():
            live = optimizer.state[by_id[i]]
            for key, value in entry.items():
                if tensor_meta(value) is not None:
                    live[key].copy_(load(value))
                else:
                    live[key] = copy.deepcopy(value)
    for group, saved_group in zip(groups, saved_groups, strict=True):
        for key, value in saved_group.items():
            if key != "params":
                group[key] = copy.deepcopy(value)
    return True


_SCALER = "lr_guard.grad_scaler"  # marks a precision state copied from a GradScaler's own tensors


def _grad_scaler(precision: Any) -> torch.amp.GradScaler | None:
    """The precision plugin's ``GradScaler`` (fp16 mixed precision), once its state lives in tensors."""
    scaler = getattr(precision, "scaler", None)
    if (
        isinstance(scaler, torch.amp.GradScaler)
        and scaler.is_enabled()
        and isinstance(getattr(scaler, "_scale", None), torch.Tensor)
        and isinstance(getattr(scaler, "_growth_tracker", None), torch.Tensor)
    ):
        return scaler
    return None


def precision_state(precision: Any) -> Any:
    """The precision plugin's state. ``GradScaler.state_dict()`` reads the scale and the growth tracker on the
    host, a host sync each on a GPU; the scaler's tensors themselves are taken instead, to be copied like the
    weights (without blocking), with its settings."""
    scaler = _grad_scaler(precision)
    if scaler is None:
        return precision.state_dict()
    return {
        _SCALER: True,
        "scale": scaler._scale,
        "growth_tracker": scaler._growth_tracker,
        "growth_factor": scaler._growth_factor,
        "backoff_factor": scaler._backoff_factor,
        "growth_interval": scaler._growth_interval,
    }


def restore_precision(precision: Any, state: dict[str, Any]) -> None:
    """Put a state from :func:`precision_state` back into the precision plugin (a scaler's tensors in place)."""
    if not state.get(_SCALER):
        precision.load_state_dict(_copy_tree(state, None))
        return
    scaler = _grad_scaler(precision)
    if scaler is None:  # the live scaler has no tensors yet: its own loader takes numbers
        precision.load_state_dict(
            {
                "scale": float(state["scale"]),
                "_growth_tracker": int(state["growth_tracker"]),
                "growth_factor": state["growth_factor"],
                "backoff_factor": state["backoff_factor"],
                "growth_interval": state["growth_interval"],
            }
        )
        return
    assert scaler._scale is not None and scaler._growth_tracker is not None
    scaler._scale.copy_(state["scale"])
    scaler._growth_tracker.copy_(state["growth_tracker"])
    scaler._growth_factor = state["growth_factor"]
    scaler._backoff_factor = state["backoff_factor"]
    scaler._growth_interval = state["growth_interval"]


def capture_rng() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's random generators (CUDA's too, where initialised)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),  # the dict form: half the cost of the legacy tuple
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
    ready: Any = None  # a CUDA event when the copy runs on a side stream; None when it is complete

    def fence(self) -> None:
        """Make the compute stream wait (on the device, without a host sync) until this snapshot's copies are
        done; call before anything may overwrite the copied tensors. A no-op on CPU."""
        if self.ready is not None:
            torch.cuda.current_stream().wait_event(self.ready)
            self.ready = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the snapshot's tensors."""
        return tree_nbytes(self.model) + tree_nbytes(self.optimizers) + tree_nbytes(self.precision)

    def restore(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        schedulers: Sequence[Any],
        precision: Any | None = None,
        restore_rng_state: bool = True,
    ) -> None:
        """Write this state back into the live objects, in place."""
        if self.ready is not None:
            self.ready.synchronize()  # a restore needs the copy finished (rare: a rollback right after it)
            self.ready = None
        if len(optimizers) != len(self.optimizers) or len(schedulers) != len(self.schedulers):
            raise ValueError(
                f"snapshot of step {self.step} has {len(self.optimizers)} optimizer(s) and "
                f"{len(self.schedulers)} scheduler(s); got {len(optimizers)} and {len(schedulers)}"
            )
        with torch.no_grad():
            model.load_state_dict(self.model, strict=True)
        for optimizer, state in zip(optimizers, self.optimizers, strict=True):
            if not restore_optimizer_in_place(optimizer, state):
                optimizer.load_state_dict(_copy_tree(state, None))
        for scheduler, state in zip(schedulers, self.schedulers, strict=True):
            scheduler.load_state_dict(copy.deepcopy(state))
        if precision is not None and self.precision is not None:
            restore_precision(precision, self.precision)
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
    reuse: Snapshot | None = None,
) -> Snapshot:
    """Copy the full training state. ``device="cpu"`` (default) or ``"same"`` (beside the originals).

    ``reuse``: a snapshot no longer needed, whose buffers are overwritten instead of allocating new ones (never
    the good one: the guard keeps two, the good one and the one being written). On an accelerator with
    ``device="cpu"``, parameters and optimizer state are copied into pinned buffers on a side stream without
    blocking the host; the snapshot's :attr:`Snapshot.ready` event completes when they are all on the host, and
    :meth:`Snapshot.fence` makes the compute stream wait for it (on the GPU, no host sync) before anything may
    overwrite the sources -- the guard calls it before the next optimizer step. Buffers (BatchNorm statistics)
    change in the forward pass, so they are copied in order on the compute stream (also without blocking).
    A ``GradScaler``'s (fp16 mixed precision) scale and growth tracker are copied from its own tensors the same
    way: its ``state_dict`` would read them on the host.
    """
    target = None if device == "same" else device
    precision_tree = precision_state(precision) if precision is not None else None
    model_state = model.state_dict()
    side = None
    if target == "cpu" and torch.cuda.is_available() and any(t.is_cuda for t in model_state.values()):
        side = torch.cuda.Stream()
    non_blocking = side is not None
    buffers = {name for name, _ in model.named_buffers()}
    old = reuse if reuse is not None else None
    params = {k: v for k, v in model_state.items() if k not in buffers}
    bufs = {k: v for k, v in model_state.items() if k in buffers}
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    # buffers first, on the compute stream: in order with the forward passes that change them, and without
    # blocking the host; the side stream then waits for them, so the `ready` event covers their copies too
    model_copy = _copy_tree(bufs, target, old.model if old else None, non_blocking, pairs)
    _copy_all(pairs, non_blocking)
    if side is not None:
        side.wait_stream(torch.cuda.current_stream())
    pairs = []
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        model_copy.update(_copy_tree(params, target, old.model if old else None, non_blocking, pairs))
        optimizers_copy = [
            _copy_tree(
                o.state_dict(),
                target,
                old.optimizers[i] if old and i < len(old.optimizers) else None,
                non_blocking,
                pairs,
            )
            for i, o in enumerate(optimizers)
        ]
        precision_copy = (
            _copy_tree(precision_tree, target, old.precision if old else None, non_blocking, pairs)
            if precision_tree
            else None
        )
        _copy_all(pairs, non_blocking)
        ready = None
        if side is not None:
            ready = torch.cuda.Event()
            ready.record(side)
    snapshot = Snapshot(
        step=step,
        model={k: model_copy[k] for k in model_state},
        optimizers=optimizers_copy,
        schedulers=[copy.deepcopy(s.state_dict()) for s in schedulers],
        precision=precision_copy,
        rng=capture_rng(),
        extra=copy.deepcopy(extra) if extra else {},
    )
    snapshot.ready = ready
    return snapshot
