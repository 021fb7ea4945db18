"""Disk-backed snapshots and the memory budget."""

import math
import os
import warnings

import pytest
import pytorch_lightning as pl
import torch
from conftest import make_trainer
from test_snapshot import model_and_optimizer

from lr_guard import Action, LRGuard
from lr_guard.actions.disk_snapshot import take_disk_snapshot
from lr_guard.actions.snapshot import tree_nbytes
from lr_guard.actions.state_io import state_nbytes as _state_bytes
from lr_guard.testing import ScriptedLossModule


def test_disk_snapshot_round_trip_is_exact_for_every_dtype(tmp_path):
    model, opt = model_and_optimizer()
    model.register_buffer("bf16_buffer", torch.arange(6, dtype=torch.bfloat16))
    snap = take_disk_snapshot(3, model, [opt], [], str(tmp_path), "slot0")
    snap.synchronize()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = opt.state_dict()["state"][0]["exp_avg"].clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.bf16_buffer.zero_()
    model(torch.randn(16, 4)).pow(2).mean().backward()
    opt.step()

    def no_full_load(state):
        raise AssertionError("the optimizer state should stream tensor by tensor, not load whole")

    opt.load_state_dict = no_full_load
    snap.restore(model, [opt], [])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == before[k].dtype, k
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], moments)
    assert os.path.getsize(snap.path) == snap.nbytes > 0 and os.path.isfile(snap.path + ".manifest")


def test_an_optimizer_loaded_whole_from_a_disk_snapshot_owns_its_state(tmp_path):
    """When the optimizer's state has another structure than the saved one (here a fresh optimizer with no
    state; in training, parameters that had no gradient yet at the snapshot), the optimizer loads the saved
    state whole and keeps the tensors it is given: they must be its own, not views of the snapshot's file,
    which is read-only and rewritten by the next snapshot in that slot (a step used to crash the process)."""
    model, opt = model_and_optimizer()
    snap = take_disk_snapshot(3, model, [opt], [], str(tmp_path), "slot0")
    snap.synchronize()
    saved = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    fresh = torch.optim.Adam(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable NumPy array" warning either
        snap.restore(model, [fresh], [])
    for key, value in fresh.state_dict()["state"][0].items():
        assert torch.equal(value, saved[key]), key
    with torch.no_grad():  # the slot rewritten with another state: the loaded one must not change with it
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(16, 4)).pow(2).mean().backward()
    opt.step()
    take_disk_snapshot(4, model, [opt], [], str(tmp_path), "slot0").synchronize()
    for key, value in fresh.state_dict()["state"][0].items():
        assert torch.equal(value, saved[key]), key
    model.zero_grad()
    model(torch.randn(16, 4)).pow(2).mean().backward()
    fresh.step()  # writes into the loaded moments
    assert fresh.state_dict()["state"][0]["step"].item() == saved["step"].item() + 1


def test_a_slot_still_being_written_is_waited_for_before_it_is_rewritten(tmp_path, monkeypatch):
    """A snapshot's file finishes writing in the background; a later snapshot into the same slot must not open
    (truncate) it and write beside the earlier writer. Here the earlier writer is held back until the later
    snapshot has had time to start."""
    import queue
    import threading
    import types

    from lr_guard.actions import disk_snapshot

    gate = threading.Event()
    run = disk_snapshot._Writer._run

    def held_back(self):
        gate.wait()
        run(self)

    monkeypatch.setattr(disk_snapshot._Writer, "_run", held_back)
    unbounded = types.SimpleNamespace(Queue=lambda maxsize: queue.Queue())  # the held writer queues everything
    monkeypatch.setattr(disk_snapshot, "queue", unbounded)
    model, opt = model_and_optimizer()
    first = take_disk_snapshot(3, model, [opt], [], str(tmp_path), "slot0")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-2.0)
    later: list = []
    thread = threading.Thread(
        target=lambda: later.append(take_disk_snapshot(4, model, [opt], [], str(tmp_path), "slot0"))
    )
    thread.start()
    thread.join(timeout=0.5)
    assert thread.is_alive() and not later  # waiting for the first writer
    gate.set()
    thread.join(timeout=30)
    assert first.done.is_set() and later
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    later[0].restore(model, [opt], [])
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert not disk_snapshot._WRITING


class FilesSeen(pl.Callback):
    """The snapshot files in ``directory`` after every step (the guard removes them when training ends)."""

    def __init__(self, directory):
        self.directory, self.seen = directory, set()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seen |= {p.name for p in self.directory.glob("*")}


def test_guard_with_disk_snapshots_rolls_back_exactly(tmp_path):
    script = [2.0 / (1.0 + 0.05 * t) for t in range(200)]
    script[45] = math.nan
    memory = LRGuard(gate=False, snapshot_every=10, confirm_steps=3)
    disk = LRGuard(gate=False, snapshot_every=10, confirm_steps=3, snapshot_device="disk", snapshot_dir=str(tmp_path))
    files = FilesSeen(tmp_path)
    modules = []
    for guard in (memory, disk):
        module = ScriptedLossModule(script, optimizer="adam", lr=0.01)
        make_trainer([guard, files], max_steps=70).fit(module)
        modules.append(module)
    assert [(d.action, d.rollback_to) for d in disk.decisions] == [(Action.ROLLBACK, 40)]
    assert [(d.action, d.rollback_to) for d in memory.decisions] == [(Action.ROLLBACK, 40)]
    for a, b in zip(modules[0].state_dict().values(), modules[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    slots = sorted(name for name in files.seen if name.endswith(".bin"))
    assert len(slots) >= 2 and slots <= ["rank0_slot0.bin", "rank0_slot1.bin", "rank0_slot2.bin"]
    assert {f"{name}.manifest" for name in slots} <= files.seen
    assert not list(tmp_path.iterdir())  # scratch as large as the state: removed when training ended


def test_memory_budget_moves_snapshots_to_disk_with_a_warning(tmp_path):
    guard = LRGuard(snapshot_every=10, snapshot_memory_budget=1000, snapshot_dir=str(tmp_path))
    with pytest.warns(
        UserWarning,
        match=r"3 snapshots of this training state need .* over "
        r"snapshot_memory_budget=.*writing them to disk instead",
    ):
        files = FilesSeen(tmp_path)
        make_trainer([guard, files], max_steps=30).fit(ScriptedLossModule([1.0], optimizer="adam"))
    assert any(name.endswith(".bin") for name in files.seen) and not list(tmp_path.glob("*.bin"))
    with pytest.raises(ValueError, match="snapshot_memory_budget must be >= 0, got -1"):
        LRGuard(snapshot_memory_budget=-1)
    with pytest.raises(ValueError, match="snapshot_device must be one of 'cpu', 'same', 'disk'; got 'nvme'"):
        LRGuard(snapshot_device="nvme")


def test_memory_budget_counts_the_optimizer_state_and_the_kept_starting_state(tmp_path):
    # Adam's moments appear with the first step, after training starts; and while the loss has made no progress
    # the starting state is kept beside the good and the pending snapshot: three copies
    script = [2.0 / (1.0 + 0.05 * t) for t in range(200)]
    module = ScriptedLossModule(script, optimizer="adam")
    trainer = make_trainer([], max_steps=1)
    trainer.fit(module)
    full = _state_bytes(module, trainer.optimizers)
    assert 3 * tree_nbytes(module.state_dict()) < 2.5 * full  # the weights alone would fit three times
    for plateau, to_disk in ((True, True), (False, False)):
        directory = tmp_path / f"plateau_{plateau}"
        guard = LRGuard(snapshot_every=10, plateau=plateau, snapshot_memory_budget=int(2.5 * full))
        guard.snapshot_dir = str(directory)
        files = FilesSeen(directory)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer([guard, files], max_steps=30).fit(ScriptedLossModule(script, optimizer="adam"))
        warned = [w for w in caught if "snapshot_memory_budget" in str(w.message)]
        assert any(name.endswith(".bin") for name in files.seen) == to_disk and len(warned) == int(to_disk)
        assert guard.counts["snapshots"] == 3
