"""Snapshots of a training state and in-place restore: weights, buffers, optimizers, schedulers, AMP, RNG.

One :class:`Snapshot` class holds a state wherever its tensors are kept -- host memory (``"cpu"``, the default:
no accelerator memory), beside the originals (``"same"``: faster, doubles the memory held), or a file on disk
(:class:`~lr_guard.actions.disk_snapshot.DiskSnapshot`, for states larger than host memory) -- and restores it by
one path: the storage only says how a saved tensor is read back (``_meta``, ``_read``, ``_owned``). Restoring
writes into the existing tensors (``load_state_dict`` copies in place), so the optimizer's references to the
parameters stay valid, and hands copies to an optimizer's ``load_state_dict`` -- torch's optimizer keeps the
tensors it is given, and a snapshot must survive being restored twice. Model and optimizer state are read and
written through a :class:`~lr_guard.actions.state_io.StateIO`, the seam a sharded strategy replaces.
"""

from __future__ import annotations

import contextlib
import copy
import random
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lr_guard.actions.lr import EFFECTIVE, FACTOR, MIN_LR, UNSCALED
from lr_guard.actions.state_io import FULL_STATE, StateIO

__all__ = [
    "Snapshot",
    "capture_rng",
    "capture_schedulers",
    "iter_tensors",
    "map_tree",
    "precision_state",
    "restore_averages",
    "restore_precision",
    "restore_rng",
    "restore_schedulers",
    "take_snapshot",
    "tree_nbytes",
]

_IMMUTABLE = frozenset((int, float, bool, str, type(None), torch.dtype, torch.device))
_NOTHING: dict[Any, Any] = {}


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def map_tree(
    tree: Any,
    fn: Callable[[Any, Any], Any],
    reuse: Any = None,
    is_leaf: Callable[[Any], bool] = _is_tensor,
) -> Any:
    """The one walker over state trees (nested dicts, lists and tuples): a copy of ``tree`` with every leaf
    (a tensor, by default) replaced by ``fn(leaf, earlier)``, where ``earlier`` is the leaf at the same place in
    ``reuse`` (a tree of the same structure, or ``None``). Immutable values are shared; anything else is deep
    copied."""
    if type(tree) in _IMMUTABLE:  # most leaves of an optimizer's state (its hyperparameters): nothing to copy
        return tree
    if is_leaf(tree):
        return fn(tree, reuse)
    if isinstance(tree, dict):
        old_items = reuse if isinstance(reuse, dict) else _NOTHING
        return {k: v if type(v) in _IMMUTABLE else map_tree(v, fn, old_items.get(k), is_leaf) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        if all(type(v) in _IMMUTABLE for v in tree):  # e.g. a param group's parameter ids
            return list(tree) if isinstance(tree, list) else tree
        old_seq = reuse if isinstance(reuse, (list, tuple)) and len(reuse) == len(tree) else [None] * len(tree)
        items = [map_tree(v, fn, r, is_leaf) for v, r in zip(tree, old_seq, strict=True)]
        return items if isinstance(tree, list) else tuple(items)
    return copy.deepcopy(tree)


def iter_tensors(tree: Any) -> Iterator[torch.Tensor]:
    """The tensors of a state tree, in :func:`map_tree`'s order."""
    found: list[torch.Tensor] = []
    map_tree(tree, lambda t, _: found.append(t))
    return iter(found)


def tree_nbytes(obj: Any) -> int:
    """Bytes held by the tensors of a state tree (nested dicts, lists and tuples)."""
    return sum(t.numel() * t.element_size() for t in iter_tensors(obj))


def _copier(
    device: str | None, non_blocking: bool, into: list[tuple[torch.Tensor, torch.Tensor]]
) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """The leaf function that copies a tensor (to ``device``, ``"cpu"`` or ``"cuda"``, when given; beside it
    when ``None``). An earlier copy of matching shape, dtype and place is written in place instead -- listed in
    ``into`` as ``(destination, source)`` for one batched copy (:func:`_copy_all`) -- so a snapshot taken every N
    steps allocates nothing once its slots exist. Copies of accelerator tensors to the host go into pinned
    memory, so they can run without blocking."""

    def copy_leaf(tensor: torch.Tensor, reuse: Any) -> torch.Tensor:
        t = tensor.detach() if tensor.requires_grad else tensor  # a state_dict's tensors are detached already
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
            into.append((reuse, t))
            return reuse
        if device is None:
            return t.clone()
        if t.is_cuda and torch.device(device).type == "cpu":
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            out.copy_(t, non_blocking=non_blocking)
            return out
        return t.to(device, copy=True)

    return copy_leaf


def _copy_all(pairs: list[tuple[torch.Tensor, torch.Tensor]], non_blocking: bool = False) -> None:
    """Make the in-place copies :func:`_copier` listed: on the host, one batched call instead of one call per
    tensor; with an accelerator involved, one ``copy_`` each (each is one asynchronous transfer anyway)."""
    if not pairs:
        return
    if non_blocking or any(d.is_cuda or s.is_cuda for d, s in pairs):
        for destination, source in pairs:
            destination.copy_(source, non_blocking=non_blocking)
        return
    destinations, sources = zip(*pairs, strict=True)
    torch._foreach_copy_(list(destinations), list(sources))


def _copy_tree(tree: Any, device: str | None, reuse: Any = None, non_blocking: bool = False) -> Any:
    """A copy of a state tree with every tensor copied (see :func:`_copier`)."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    out = map_tree(tree, _copier(device, non_blocking, pairs), reuse)
    _copy_all(pairs, non_blocking)
    return out


def _tensor_meta(value: Any) -> tuple[tuple[int, ...], torch.dtype] | None:
    return (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else None


def restore_optimizer_in_place(
    optimizer: torch.optim.Optimizer,
    saved: dict[str, Any],
    tensor_meta: Callable[[Any], tuple[tuple[int, ...], torch.dtype] | None] = _tensor_meta,
    load: Callable[[Any], torch.Tensor] = lambda value: value,
    local: Callable[[torch.Tensor], torch.Tensor] = lambda tensor: tensor,
) -> bool:
    """Copy a saved optimizer state into the optimizer's own state tensors, one tensor at a time (no allocation).

    ``tensor_meta(value)`` says whether a saved value is a tensor (its shape and dtype) and ``load(value)`` gives
    it, so the saved tensors may be in memory (the defaults) or still on disk; ``local(tensor)`` is the part of a
    live state tensor they were copied from (:meth:`~lr_guard.actions.state_io.StateIO.local`: this rank's shard
    under a sharded strategy). Returns ``False`` (nothing changed)
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
            if meta is not None and meta != (tuple(local(current).shape), current.dtype):
                return False
    with torch.no_grad():
        for i, entry in saved_state.items():
            live = optimizer.state[by_id[i]]
            for key, value in entry.items():
                if tensor_meta(value) is not None:
                    local(live[key]).copy_(load(value))
                else:
                    live[key] = copy.deepcopy(value)
    for group, saved_group in zip(groups, saved_groups, strict=True):
        for key in [k for k in group if k not in saved_group]:  # as load_state_dict: the group is the saved one
            del group[key]  # (e.g. the guard's LR factor of a cut made after the snapshot)
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


def capture_schedulers(schedulers: Sequence[Any]) -> list[tuple[Any, dict[str, Any]]]:
    """Each scheduler's state, with a weak reference to the scheduler itself: restored by identity, not by
    position (:func:`restore_schedulers`)."""
    return [(weakref.ref(s), copy.deepcopy(s.state_dict())) for s in schedulers]


def restore_schedulers(saved: Sequence[tuple[Any, dict[str, Any]]], schedulers: Sequence[Any]) -> None:
    """Give each of ``schedulers`` that was in the run when ``saved`` was taken its saved state back.

    Matched by identity: a scheduler that appeared since (Lightning's ``StochasticWeightAveraging`` swaps in its
    ``SWALR`` at ``swa_epoch_start``) keeps its own state, and the state of one that has left the run (the
    scheduler SWA swapped out) is never loaded into another, whatever their positions or types.
    """
    for ref, state in saved:
        scheduler = ref()
        if scheduler is not None and any(scheduler is live for live in schedulers):
            scheduler.load_state_dict(copy.deepcopy(state))


def restore_averages(saved: Sequence[dict[str, Any]], live: Sequence[dict[str, torch.Tensor]]) -> None:
    """Copy saved averages (weight averaging's averaged tensors by name) into the live tensors, in place. A
    tensor that has appeared since the snapshot (the count SWA creates when it starts averaging) is zeroed:
    nothing had been averaged into it at the snapshot's step."""
    if len(saved) != len(live):
        raise ValueError(f"snapshot holds {len(saved)} weight average(s); the run has {len(live)}")
    with torch.no_grad():
        for saved_tensors, live_tensors in zip(saved, live, strict=True):
            for name, tensor in live_tensors.items():
                if name in saved_tensors:
                    tensor.copy_(saved_tensors[name])
                else:
                    tensor.zero_()


_GUARD_KEYS = frozenset((FACTOR, UNSCALED, EFFECTIVE, MIN_LR))


def _added_group_keys(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> list[dict[str, Any]]:
    """Per param group, the entries added since ``saved`` by someone other than the guard: a scheduler that
    appeared since keeps what it wrote there (``SWALR``'s ``swa_lr``). The guard's own entries (the factor of a
    cut made after the snapshot) are the snapshot's."""
    saved_groups = saved.get("param_groups", [])
    return [
        {k: v for k, v in group.items() if k not in saved_group and k not in _GUARD_KEYS}
        for group, saved_group in zip(optimizer.param_groups, saved_groups, strict=False)
    ]


@dataclass
class Snapshot:
    """A training state at one step, its tensors in memory. Build it with :func:`take_snapshot`; apply it with
    :meth:`restore`. Subclasses keep the tensors elsewhere and override only how a saved tensor is read back."""

    step: int
    model: dict[str, Any]
    optimizers: list[dict[str, Any]]
    schedulers: list[tuple[Any, dict[str, Any]]]  # (a weak reference to the scheduler, its state)
    precision: dict[str, Any] | None
    rng: dict[str, Any]
    ready: Any = None  # a CUDA event while the copy runs on a side stream; None when it is complete
    averages: list[dict[str, Any]] = field(default_factory=list)  # weight averages (EMA, SWA) by name

    # -- how saved tensors are read back (memory: they are the tensors) ----------------------------------------
    def _meta(self, leaf: Any) -> tuple[tuple[int, ...], torch.dtype] | None:
        return _tensor_meta(leaf)

    def _read(self, leaf: Any) -> torch.Tensor:
        """A saved tensor, to be copied from at once."""
        return leaf

    def _owned(self, tree: Any) -> Any:
        """The tree with tensors of its own, for a caller that keeps them (an optimizer's ``load_state_dict``)."""
        return _copy_tree(tree, None)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        yield

    def _is_saved_tensor(self, leaf: Any) -> bool:
        return isinstance(leaf, torch.Tensor)

    # -- the snapshot ------------------------------------------------------------------------------------------
    @property
    def copying(self) -> bool:
        """Its copies may still be running on a side stream (GPU only): :meth:`fence` before the sources change."""
        return self.ready is not None

    def fence(self) -> None:
        """Make the compute stream wait (on the device, without a host sync) until this snapshot's copies are
        done; call before anything may overwrite the copied tensors. A no-op when nothing is copying."""
        if self.ready is not None:
            torch.cuda.current_stream().wait_event(self.ready)
            self.ready = None

    def synchronize(self) -> None:
        """Wait on the host until the snapshot is complete (rare: a rollback right after it)."""
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the snapshot's tensors."""
        return sum(map(tree_nbytes, (self.model, self.optimizers, self.precision, self.averages)))

    def restore(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        schedulers: Sequence[Any],
        precision: Any | None = None,
        state_io: StateIO = FULL_STATE,
        averages: Sequence[dict[str, torch.Tensor]] = (),
    ) -> None:
        """Write this state back into the live objects, in place (also the RNG states and the weight averages:
        ``averages``, the live tensors of each average by name, as they were handed to the snapshot)."""
        self.synchronize()
        if len(optimizers) != len(self.optimizers):
            raise ValueError(
                f"snapshot of step {self.step} has {len(self.optimizers)} optimizer(s); got {len(optimizers)}"
            )
        _check_same_tensors(self.step, self.model, state_io.model_state(model))
        with self._reading():
            read = self._read_tree
            state_io.load_model_state(model, read(self.model))
            for optimizer, saved in zip(optimizers, self.optimizers, strict=True):
                added = _added_group_keys(optimizer, saved)
                if not restore_optimizer_in_place(optimizer, saved, self._meta, self._read, state_io.local):
                    state_io.load_optimizer_state(optimizer, self._owned(saved))
                for group, entries in zip(optimizer.param_groups, added, strict=False):
                    group.update(entries)
            restore_schedulers(self.schedulers, schedulers)
            if precision is not None and self.precision:
                restore_precision(precision, read(self.precision))
            if averages or self.averages:
                restore_averages(read(self.averages), averages)
            restore_rng(self.rng)

    def _read_tree(self, tree: Any) -> Any:
        return map_tree(tree, lambda leaf, _: self._read(leaf), is_leaf=self._is_saved_tensor)


def _check_same_tensors(step: int, saved: dict[str, Any], live: dict[str, Any]) -> None:
    """Refuse, before anything is written, to restore a snapshot into a model whose parameters or buffers have
    changed since it was taken (a rollback must put back every tensor of the model)."""
    added, gone = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    if not added and not gone:
        return
    what = []
    if added:
        what.append(f"the model has {', '.join(map(repr, added))}, registered after the snapshot was taken")
    if gone:
        what.append(f"the snapshot holds {', '.join(map(repr, gone))}, which the model no longer has")
    raise RuntimeError(
        f"lr_guard cannot roll back to step {step}: {'; '.join(what)}. Nothing was restored. Create every "
        "parameter and buffer before training starts (in __init__, setup() or configure_model()), so that every "
        "snapshot holds the whole model"
    )


def take_snapshot(
    step: int,
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[Any],
    precision: Any | None = None,
    device: str = "cpu",
    reuse: Snapshot | None = None,
    state_io: StateIO = FULL_STATE,
    averages: Sequence[dict[str, torch.Tensor]] = (),
) -> Snapshot:
    """Copy the full training state into memory. ``device="cpu"`` (default) or ``"same"`` (beside the originals).

    ``reuse``: a snapshot no longer needed, whose buffers are overwritten instead of allocating new ones (never
    the good one). On an accelerator with ``device="cpu"``, parameters and optimizer state are copied into pinned
    buffers on a side stream without blocking the host; the snapshot's :attr:`Snapshot.ready` event completes
    when they are all on the host, and :meth:`Snapshot.fence` makes the compute stream wait for it (on the GPU, no
    host sync) before anything may overwrite the sources -- the guard calls it before the next optimizer step.
    Buffers (BatchNorm statistics) change in the forward pass, so they are copied in order on the compute stream
    (also without blocking). A ``GradScaler``'s (fp16 mixed precision) scale and growth tracker are copied from
    its own tensors the same way: its ``state_dict`` would read them on the host. ``averages``: the tensors of
    each weight average (EMA, SWA) beside the model, by name, copied like the weights.
    """
    target = None if device == "same" else device
    model_state = state_io.model_state(model)
    side = None
    if target == "cpu" and torch.cuda.is_available() and any(t.is_cuda for t in model_state.values()):
        side = torch.cuda.Stream()
    buffers = state_io.buffer_names(model)
    old = reuse.model if reuse is not None else None
    # buffers first, on the compute stream: in order with the forward passes that change them, and without
    # blocking the host; the side stream then waits for them, so the `ready` event covers their copies too
    model_copy = _copy_tree({k: v for k, v in model_state.items() if k in buffers}, target, old, side is not None)
    if side is not None:
        side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        trees = {
            "params": {k: v for k, v in model_state.items() if k not in buffers},
            "optimizers": [state_io.optimizer_state(o) for o in optimizers],
            "precision": (precision_state(precision) if precision is not None else None) or None,
            "averages": list(averages),
        }
        earlier: dict[str, Any] = {"params": old}
        if reuse is not None:
            earlier.update(optimizers=reuse.optimizers, precision=reuse.precision, averages=reuse.averages)
        copies = _copy_tree(trees, target, earlier, side is not None)
        ready = None
        if side is not None:
            ready = torch.cuda.Event()
            ready.record(side)
    model_copy.update(copies["params"])
    return Snapshot(
        step=step,
        model={k: model_copy[k] for k in model_state},
        optimizers=copies["optimizers"],
        schedulers=capture_schedulers(schedulers),
        precision=copies["precision"],
        rng=capture_rng(),
        ready=ready,
        averages=copies["averages"],
    )
