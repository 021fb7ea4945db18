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
import os
import pickle
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lr_guard.actions.snapshot import Snapshot, capture_rng, capture_schedulers, map_tree, precision_state
from lr_guard.actions.state_io import FULL_STATE, StateIO

__all__ = ["DiskSnapshot", "remove_snapshot_files", "take_disk_snapshot"]

_TENSOR = "__lr_guard_tensor__"


@dataclass
class DiskSnapshot(Snapshot):
    """A training state on disk (``path`` + ``path.manifest``): a :class:`Snapshot` whose saved tensors are
    entries of the manifest, read back from the memory-mapped file."""

    path: str = ""
    written: int = 0  # bytes in the file
    done: threading.Event = field(default_factory=threading.Event)
    error: list[BaseException] = field(default_factory=list)
    _data: Any = field(default=None, init=False, repr=False)  # the file, memory-mapped while restoring

    @property
    def nbytes(self) -> int:
        return self.written

    def synchronize(self) -> None:
        """Wait until the background writer has written the file; raise what made it fail."""
        self.done.wait()
        if self.error:
            raise RuntimeError(f"writing the snapshot of step {self.step} to {self.path} failed") from self.error[0]

    def _is_saved_tensor(self, leaf: Any) -> bool:
        return isinstance(leaf, dict) and bool(leaf.get(_TENSOR))

    def _meta(self, leaf: Any) -> tuple[tuple[int, ...], torch.dtype] | None:
        """Shape and dtype of a tensor written to the file (from the manifest: nothing is read)."""
        if self._is_saved_tensor(leaf):
            return tuple(leaf["shape"]), leaf["dtype"]
        return None

    def _read(self, leaf: Any) -> torch.Tensor:
        """A view of the mapped file (copy-on-write: the file is never written through it), to copy from at once."""
        offset, count = leaf["offset"], leaf["nbytes"]
        raw = torch.from_numpy(np.asarray(self._data[offset : offset + count]))
        return raw.view(leaf["dtype"]).reshape(leaf["shape"])

    def _owned(self, tree: Any) -> Any:
        """Tensors of their own: an optimizer's ``load_state_dict`` keeps the tensors it is given, and writes into
        them at its next step (views of the file would change with the next snapshot into this slot)."""
        return map_tree(tree, lambda leaf, _: self._read(leaf).clone(), is_leaf=self._is_saved_tensor)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        self._data = np.memmap(self.path, dtype=np.uint8, mode="c") if self.written else np.zeros(0, np.uint8)
        try:
            yield
        finally:
            self._data = None


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


def take_disk_snapshot(
    step: int,
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[Any],
    directory: str,
    slot: str,
    precision: Any | None = None,
    state_io: StateIO = FULL_STATE,
    averages: Sequence[dict[str, torch.Tensor]] = (),
) -> DiskSnapshot:
    """Stream the full training state to ``directory/slot.bin`` (its manifest to ``slot.manifest``).

    Returns once every tensor has been copied to the host (the live tensors may change from then on); the file
    write finishes in the background (``DiskSnapshot.done``).
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.abspath(os.path.join(directory, f"{slot}.bin"))
    snapshot = DiskSnapshot(step, {}, [], [], None, {}, path=path)
    writer = _Writer(path, snapshot)

    def stream(tree: Any) -> Any:
        return map_tree(tree, lambda tensor, _: writer.put(tensor))

    try:
        snapshot.model = stream(state_io.model_state(model))
        snapshot.optimizers = [stream(state_io.optimizer_state(o)) for o in optimizers]
        snapshot.schedulers = capture_schedulers(schedulers)
        snapshot.precision = stream(precision_state(precision)) if precision is not None else None
        snapshot.averages = [stream(dict(average)) for average in averages]
        snapshot.rng = capture_rng()
    finally:
        writer.close()
    snapshot.written = writer.offset
    with open(path + ".manifest", "wb") as f:
        pickle.dump({"step": step, "nbytes": writer.offset}, f)
    return snapshot
