"""Disk-backed snapshots, for training states larger than host memory.

Tensors are copied to the host one at a time and handed to a background writer thread through a queue of one, so the
host holds at most three of the state's tensors at once (one being written, one waiting, one being copied); the
writer appends their raw bytes to one file per slot. Everything that is not a tensor (scheduler states, step
counters, hyperparameters, RNG) goes to a small manifest beside it. Restoring memory-maps the file and copies each
tensor straight into the live tensor it came from, so it needs no host copy of the whole state either. Any dtype
round-trips (bytes are bytes; bf16 included).
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lr_guard.actions.snapshot import (
    capture_rng,
    precision_state,
    restore_optimizer_in_place,
    restore_precision,
    restore_rng,
)

__all__ = ["DiskSnapshot", "remove_snapshot_files", "take_disk_snapshot"]

_TENSOR = "__lr_guard_tensor__"


def _entry_meta(value: Any) -> tuple[tuple[int, ...], torch.dtype] | None:
    """Shape and dtype of a tensor written to the file (from the manifest: nothing is read)."""
    if isinstance(value, dict) and value.get(_TENSOR):
        return tuple(value["shape"]), value["dtype"]
    return None


@dataclass
class DiskSnapshot:
    """A training state on disk (``path`` + ``path.manifest``); same interface as :class:`Snapshot`."""

    step: int
    path: str
    manifest: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    error: list[BaseException] = field(default_factory=list)

    @property
    def ready(self) -> DiskSnapshot | None:
        return None if self.done.is_set() else self

    def synchronize(self) -> None:
        self.done.wait()
        if self.error:
            raise RuntimeError(f"writing the snapshot of step {self.step} to {self.path} failed") from self.error[0]

    def fence(self) -> None:
        """Nothing to wait for: every tensor was copied to the host before :func:`take_disk_snapshot` returned."""

    def _load(self, tree: Any, data: Any, owned: bool = False) -> Any:
        """The saved tree with its tensors read from ``data`` (the memory-mapped file): views of the read-only
        mapping, to be copied from at once, or with ``owned`` tensors of their own, for a caller that keeps them
        (an optimizer's ``load_state_dict`` keeps the tensors it is given, and writes into them at its next step)."""
        if isinstance(tree, dict) and tree.get(_TENSOR):
            offset, count = tree["offset"], tree["nbytes"]
            raw = torch.from_numpy(np.asarray(data[offset : offset + count]))
            tensor = raw.view(tree["dtype"]).reshape(tree["shape"])
            return tensor.clone() if owned else tensor
        if isinstance(tree, dict):
            return {k: self._load(v, data, owned) for k, v in tree.items()}
        if isinstance(tree, list):
            return [self._load(v, data, owned) for v in tree]
        if isinstance(tree, tuple):
            return tuple(self._load(v, data, owned) for v in tree)
        return tree

    def restore(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        schedulers: Sequence[Any],
        precision: Any | None = None,
        restore_rng_state: bool = True,
    ) -> None:
        """Write this state back into the live objects, in place, one tensor at a time from the file (the host
        never holds more than one tensor of the state)."""
        self.synchronize()
        # copy-on-write: the file is never written through the mapping, and torch gets a writable array
        data = np.memmap(self.path, dtype=np.uint8, mode="c") if self.nbytes else np.zeros(0, np.uint8)
        manifest = self.manifest
        live = model.state_dict()
        if set(live) != set(manifest["model"]):
            raise ValueError(f"snapshot of step {self.step} holds other model keys than the model now has")
        with torch.no_grad():
            for name, tensor in live.items():
                tensor.copy_(self._load(manifest["model"][name], data))
        for optimizer, entry in zip(optimizers, manifest["optimizers"], strict=True):
            if not restore_optimizer_in_place(optimizer, entry, _entry_meta, lambda e: self._load(e, data)):
                optimizer.load_state_dict(self._load(entry, data, owned=True))
        for scheduler, saved in zip(schedulers, manifest["schedulers"], strict=True):
            scheduler.load_state_dict(copy.deepcopy(saved))
        if precision is not None and manifest["precision"]:
            restore_precision(precision, self._load(manifest["precision"], data))
        if restore_rng_state:
            restore_rng(manifest["rng"])


# file path -> the snapshot whose writer thread is writing it: a slot is rewritten only once its last write ended
_WRITING: dict[str, DiskSnapshot] = {}
_WRITING_LOCK = threading.Lock()


class _Writer:
    """Appends tensors' bytes to a file from a background thread; the queue of one bounds the host memory held.
    A file still being written by an earlier snapshot's writer is waited for before it is opened again."""

    def __init__(self, path: str, snapshot: DiskSnapshot) -> None:
        self.path, self.offset, self.snapshot = path, 0, snapshot
        self.queue: queue.Queue[torch.Tensor | None] = queue.Queue(maxsize=1)
        while True:
            with _WRITING_LOCK:
                earlier = _WRITING.get(path)
                if earlier is None:
                    _WRITING[path] = snapshot
                    break
            earlier.done.wait()  # its thread unregisters the file before it sets done
        try:
            self.file = open(path, "wb")  # closed by the writer thread
        except BaseException:
            self._unregister()
            raise
        self.thread = threading.Thread(target=self._run, name="lr_guard-snapshot-writer", daemon=True)
        self.thread.start()

    def put(self, tensor: torch.Tensor) -> dict[str, Any]:
        host = tensor.detach().to("cpu", copy=True).contiguous()
        nbytes = host.numel() * host.element_size()
        entry = {
            _TENSOR: True,
            "offset": self.offset,
            "nbytes": nbytes,
            "dtype": host.dtype,
            "shape": tuple(host.shape),
        }
        self.offset += nbytes
        self.queue.put(host)  # blocks while the writer is behind: bounded memory
        return entry

    def close(self) -> None:
        self.queue.put(None)

    def _run(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                if item.numel():
                    self.file.write(item.reshape(-1).view(torch.uint8).numpy().tobytes())
        except BaseException as err:  # surfaced by DiskSnapshot.synchronize
            self.snapshot.error.append(err)
            while self.queue.get() is not None:  # keep draining, so the producer never blocks on a dead writer
                pass
        finally:
            self.file.close()
            self._unregister()
            self.snapshot.done.set()

    def _unregister(self) -> None:
        with _WRITING_LOCK:
            del _WRITING[self.path]


def remove_snapshot_files(path: str) -> None:
    """Delete a snapshot's files (``path`` and its manifest), once a writer still writing it has finished: they
    are scratch, readable only through the :class:`DiskSnapshot` that wrote them, which ends with the process."""
    path = os.path.abspath(path)
    with _WRITING_LOCK:
        writing = _WRITING.get(path)
    if writing is not None:
        writing.done.wait()
    for name in (path, path + ".manifest"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(name)


def _stream(tree: Any, writer: _Writer) -> Any:
    if isinstance(tree, torch.Tensor):
        return writer.put(tree)
    if isinstance(tree, dict):
        return {k: _stream(v, writer) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_stream(v, writer) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_stream(v, writer) for v in tree)
    return copy.deepcopy(tree)


def take_disk_snapshot(
    step: int,
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[Any],
    directory: str,
    slot: str,
    precision: Any | None = None,
) -> DiskSnapshot:
    """Stream the full training state to ``directory/slot.bin`` (its manifest to ``slot.manifest``).

    Returns once every tensor has been copied to the host (the live tensors may change from then on); the file
    write finishes in the background (``DiskSnapshot.done``).
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.abspath(os.path.join(directory, f"{slot}.bin"))
    snapshot = DiskSnapshot(step, path)
    writer = _Writer(path, snapshot)
    try:
        manifest = {
            "model": _stream(model.state_dict(), writer),
            "optimizers": [_stream(o.state_dict(), writer) for o in optimizers],
            "schedulers": [copy.deepcopy(s.state_dict()) for s in schedulers],
            "precision": _stream(precision_state(precision), writer) if precision is not None else None,
            "rng": capture_rng(),
        }
    finally:
        writer.close()
    snapshot.manifest = manifest
    snapshot.nbytes = writer.offset
    with open(path + ".manifest", "wb") as f:
        pickle.dump({"step": step, "nbytes": writer.offset}, f)
    return snapshot
