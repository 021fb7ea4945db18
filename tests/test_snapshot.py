"""Snapshots in plain torch, over every storage: exact copies, in-place restore, reuse of buffers; the store."""

import copy
import os

import pytest
import torch
from torch import nn

from lr_guard.actions import SnapshotStore, Targets, take_snapshot
from lr_guard.actions.disk_snapshot import take_disk_snapshot


def model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(16, 4)).pow(2).mean().backward()
    opt.step()
    return model, opt


def test_restore_is_exact_and_in_place():
    model, opt = model_and_optimizer()
    params = [p.data_ptr() for p in model.parameters()]
    snap = take_snapshot(1, model, [opt], [])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = opt.state_dict()["state"][0]["exp_avg"].clone()
    model(torch.randn(16, 4)).pow(2).mean().backward()
    opt.step()
    snap.restore(model, [opt], [])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], moments)
    assert [p.data_ptr() for p in model.parameters()] == params  # the optimizer's references stay valid
    assert snap.nbytes > 0 and snap.fence() is None


def test_a_spare_snapshot_is_overwritten_in_place():
    model, opt = model_and_optimizer()
    first = take_snapshot(1, model, [opt], [])
    pointers = [t.data_ptr() for t in first.model.values()]
    moment_ptr = first.optimizers[0]["state"][0]["exp_avg"].data_ptr()
    model(torch.randn(16, 4)).pow(2).mean().backward()
    opt.step()
    second = take_snapshot(2, model, [opt], [], reuse=first)
    assert [t.data_ptr() for t in second.model.values()] == pointers  # no new allocation
    assert second.optimizers[0]["state"][0]["exp_avg"].data_ptr() == moment_ptr
    assert all(torch.equal(a, b) for a, b in zip(second.model.values(), model.state_dict().values(), strict=True))
    assert second.step == 2


STORAGES = ("cpu", "same", "disk")


def take(kind, step, model, optimizers, schedulers, directory, reuse=None):
    if kind == "disk":
        snapshot = take_disk_snapshot(step, model, optimizers, schedulers, str(directory), f"slot{step}")
        snapshot.synchronize()
        return snapshot
    return take_snapshot(step, model, optimizers, schedulers, device=kind, reuse=reuse)


def full_state(model, opt, scheduler):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        copy.deepcopy(opt.state_dict()),
        copy.deepcopy(scheduler.state_dict()),
    )


def assert_same_state(a, b):
    (model_a, opt_a, sched_a), (model_b, opt_b, sched_b) = a, b
    assert model_a.keys() == model_b.keys() and all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert opt_a["param_groups"] == opt_b["param_groups"] and sched_a == sched_b
    for i, entry in opt_a["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(opt_b["state"][i][k])) for k, v in entry.items())


def train_a_step(model, opt, scheduler):
    model(torch.randn(16, 4)).pow(2).mean().backward()  # the forward pass changes BatchNorm's buffers in place
    opt.step()  # the parameters and Adam's moments change in place
    opt.zero_grad()
    scheduler.step()


@pytest.mark.parametrize("kind", STORAGES)
def test_every_storage_restores_the_state_exactly_after_it_changed_in_place(kind, tmp_path):
    """A storage that kept references to the live tensors (an aliasing "same" copy) would see them change with
    the training steps and restore the changed state: this fails for it."""
    model, opt = model_and_optimizer()
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    snapshot = take(kind, 1, model, [opt], [scheduler], tmp_path)
    saved = full_state(model, opt, scheduler)
    draw = torch.rand(3)  # the RNG is part of the state: after a restore the same numbers come again
    for _ in range(3):
        train_a_step(model, opt, scheduler)
    snapshot.restore(model, [opt], [scheduler])
    assert_same_state(full_state(model, opt, scheduler), saved)
    assert torch.equal(torch.rand(3), draw)
    train_a_step(model, opt, scheduler)  # a snapshot survives being restored: restoring it twice gives it twice
    snapshot.restore(model, [opt], [scheduler])
    assert_same_state(full_state(model, opt, scheduler), saved)


def test_a_store_frees_reuses_restores_and_cleans_up(tmp_path):
    model, opt = model_and_optimizer()
    targets = Targets(model, [opt], [])
    store = SnapshotStore("cpu")
    first = store.take(0, targets)
    store.take(10, targets)
    store.keep_only({10})  # the snapshot of step 0 is freed, and its buffers are reused by the next one
    assert store.steps == [10]
    pointers = [t.data_ptr() for t in first.model.values()]
    third = store.take(20, targets)
    assert [t.data_ptr() for t in third.model.values()] == pointers
    store.take(5, targets)
    store.restore(10, targets)
    assert store.steps == [5, 10]  # the states after the restored one are gone; an earlier one stays restorable
    store.restore(5, targets)
    assert store.steps == [5]

    disk = SnapshotStore("disk", directory=str(tmp_path), rank=1)
    disk.take(0, targets)
    disk.take(10, targets)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "rank1_slot0.bin",
        "rank1_slot0.bin.manifest",
        "rank1_slot1.bin",
        "rank1_slot1.bin.manifest",
    ]
    disk.close()
    assert not list(tmp_path.iterdir()) and len(disk) == 0


def test_a_store_over_its_memory_budget_moves_to_disk(tmp_path):
    model, opt = model_and_optimizer()
    store = SnapshotStore("cpu", memory_budget=100, directory=str(tmp_path))
    with pytest.warns(UserWarning, match=r"2 snapshots of this training state need .* writing them to disk"):
        snapshot = store.take(0, Targets(model, [opt], []))
    snapshot.synchronize()  # its file is written by a background thread
    assert store.storage == "disk" and snapshot.nbytes == os.path.getsize(snapshot.path)
    store.close()
