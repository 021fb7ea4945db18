"""Real sharded training (torch's ``fully_shard``, FSDP2, under Lightning's ``ModelParallelStrategy``: 2 processes,
gloo on CPU): each rank snapshots and restores its own shard, and every rank takes the same decision at the same
step. Each run has a time limit (``run_ddp``): a rank left waiting on a collective fails the test."""

from pathlib import Path

import pytest
import torch
from test_ddp import run_ddp

from lr_guard import LRGuard
from lr_guard.testing import ScriptedLossModule

fsdp = pytest.importorskip("torch.distributed.fsdp", reason="this torch has no torch.distributed")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available() and hasattr(fsdp, "fully_shard")):
    pytest.skip("needs torch.distributed with gloo and fully_shard (FSDP2)", allow_module_level=True)

WORKER = Path(__file__).with_name("sharded_worker.py")
FULL_MODEL = 8 * 16 + 16 + 2 * 16 + 16 + 1  # the scripted module's parameters: Linear, BatchNorm, Linear


def test_a_nan_batch_on_one_rank_is_skipped_by_the_gate_on_both_ranks(tmp_path):
    """The gradient norm the gate scores is the global one over both ranks' shards (one all-reduce), so a NaN in
    rank 1's batch is skipped on both at the same step, with no rollback."""
    ranks = run_ddp("gate_nan_on_rank1", tmp_path, WORKER)
    assert [r["state_io"] for r in ranks] == ["ShardedStateIO"] * 2
    assert ranks[0]["decisions"] == ranks[1]["decisions"] == [[25, "skip", None]]
    assert all(r["finite"] and r["global_step"] == 60 for r in ranks)


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_a_divergence_is_rolled_back_on_both_ranks_to_the_same_step_shard_for_shard(tmp_path, storage):
    """Every rank's local tensors after the rollback -- its shards of the parameters and of Adam's moments and
    step counts, and its buffers -- equal those it held at the snapshot's step, bit for bit; each rank's snapshot
    (in host memory, or a file of its own) holds its own shard only."""
    ranks = run_ddp("nan_on_rank1" + ("_disk" if storage == "disk" else ""), tmp_path, WORKER)
    assert ranks[0]["decisions"] == ranks[1]["decisions"] == [[25, "rollback", 20]]
    for rank in ranks:
        [[step, equal, keys]] = rank["restored_equal_snapshot"]
        assert step == 20 and equal, rank
        assert any(k.startswith("optimizer/") and k.endswith("/exp_avg") for k in keys)
        assert rank["finite"] and rank["lr"] == pytest.approx(0.01)  # one NaN after a calm stretch: LR kept
        assert max(rank["snapshot_bytes"]) == rank["local_bytes"]  # the shard's bytes, not the model's
    assert sum(r["local_numel"] for r in ranks) == FULL_MODEL and min(r["local_numel"] for r in ranks) < FULL_MODEL


def test_a_rollback_to_the_start_clears_the_optimizer_state_on_both_ranks_and_training_goes_on(tmp_path):
    """The starting snapshot holds no optimizer state (Adam's moments appear with its first step): a rollback to
    it empties the optimizer's state on every rank, and the next steps build new sharded state."""
    ranks = run_ddp("nan_at_step5_on_rank0", tmp_path, WORKER)
    assert ranks[0]["decisions"] == ranks[1]["decisions"] == [[5, "rollback", 0]]
    for rank in ranks:
        [[step, equal, keys]] = rank["restored_equal_snapshot"]
        assert step == 0 and equal and not any(k.startswith("optimizer/") for k in keys), rank
        assert rank["finite"] and rank["global_step"] == 60


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["sharded", "full"])
def test_the_stop_checkpoint_is_in_the_strategy_format_and_resumes_shard_for_shard(tmp_path, layout):
    """Exhausted rollbacks stop both ranks at the same step with one checkpoint written by the strategy (a folder
    of shards with ``save_distributed_checkpoint=True``, one file with ``False``); ``Trainer.fit(ckpt_path=...)``
    resumes from it with every rank's shards of the parameters and the optimizer state as they were at the stop,
    and trains on with the LR of the good state and no decision."""
    suffix = "" if layout == "sharded" else "_full"
    stop = tmp_path / "stop"
    stop.mkdir()
    stopped = run_ddp("always_nan_on_rank0" + suffix, stop, WORKER)
    assert stopped[0]["decisions"] == stopped[1]["decisions"]
    assert [d[1] for d in stopped[0]["decisions"]] == ["rollback", "rollback", "stop"]
    checkpoint = Path(stopped[0]["checkpoint"])
    assert stopped[1]["checkpoint"] == str(checkpoint) and checkpoint.is_dir() == (layout == "sharded")
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    resumed = run_ddp("resume" + suffix, resumed_dir, WORKER, checkpoint)
    assert all(r["decisions"] == [] and r["global_step"] == 50 and r["finite"] for r in resumed)
    assert all(r["lr"] == pytest.approx(0.01) for r in resumed)  # the good state's LR, before the second cut
    at_stop = [torch.load(stop / f"rank{r}_end.pt") for r in (0, 1)]
    for r in (0, 1):
        loaded = torch.load(resumed_dir / f"rank{r}_start.pt")
        assert loaded.keys() == at_stop[r].keys()
        for key, tensor in loaded.items():
            if key.startswith("model/net.1.running_"):
                # buffers are not sharded: each rank has its own BatchNorm statistics, of which the strategy's
                # checkpoint keeps one rank's
                assert any(torch.equal(tensor, state[key]) for state in at_stop), key
            else:
                assert torch.equal(tensor, at_stop[r][key]), (r, key)


def test_model_parallel_without_a_sharded_model_is_refused():
    """Under ``ModelParallelStrategy`` with no ``fully_shard`` nothing keeps the ranks' weights in step."""
    from lr_guard.callbacks.strategies import state_io_for

    strategy = type("ModelParallelStrategy", (), {})()  # the guard looks at the strategy's class name only
    trainer = type("Trainer", (), {"strategy": strategy})()
    with pytest.raises(ValueError, match=r"LRGuard under ModelParallelStrategy needs a sharded model.*fully_shard"):
        state_io_for(trainer, ScriptedLossModule([1.0]), type(LRGuard()).__name__)
