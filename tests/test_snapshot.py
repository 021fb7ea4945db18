"""Snapshots in plain torch: exact copies, in-place restore, reuse of buffers."""

import torch
from torch import nn

from lr_guard.actions import take_snapshot


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
