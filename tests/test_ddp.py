"""Real multi-process DDP (2 processes, gloo on CPU): every rank takes the same action on the same step."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ddp_worker.py")


def free_port():
    """A port nobody listens on now, for this run's rendezvous (each run its own: no clash with one before)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ddp(scenario, tmp_path, worker=WORKER, *args):
    """Run ``worker`` on 2 ranks for ``scenario`` (more command-line ``args`` after the output folder); each
    rank's OUT/rank{r}.json."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, str(worker), scenario, str(tmp_path), *map(str, args)],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=120)  # a normal run takes ~11 s; a deadlock fails instead of hanging
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # both ranks: the launcher's child is in the same session
        proc.communicate()
        pytest.fail(f"DDP run {scenario!r} did not finish in 120 s (a rank waiting on a collective?)")
    assert proc.returncode == 0, stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    return ranks


@pytest.mark.slow
def test_nan_on_one_rank_rolls_back_both_and_parameters_stay_identical(tmp_path):
    r0, r1 = run_ddp("nan_on_rank1", tmp_path)
    assert r0["decisions"] == r1["decisions"] == [[25, "rollback", 20]]
    assert r0["params_sha256"] == r1["params_sha256"] and r0["finite"] and r1["finite"]
    assert r0["lr"] == r1["lr"] == pytest.approx(0.01)  # one NaN after a calm stretch: a bad batch, LR kept


@pytest.mark.slow
def test_a_nan_on_one_rank_in_a_warm_up_caps_the_lr_alike_on_both(tmp_path):
    r0, r1 = run_ddp("warmup_nan_on_rank1", tmp_path)
    assert r0["decisions"] == r1["decisions"] == [[25, "rollback", 20]]
    assert r0["lr_caps"] == r1["lr_caps"] and r0["lr_caps"][0] == pytest.approx(0.1 * 0.01 * (0.1 + 0.9 * 25 / 60))
    assert r0["lr"] == r1["lr"] and r0["params_sha256"] == r1["params_sha256"]


@pytest.mark.slow
def test_the_lr_sweep_reads_the_same_threshold_on_both_ranks_with_no_collective_of_its_own(tmp_path):
    r0, r1 = run_ddp("sweep_blows_up_on_rank1", tmp_path)
    assert r0["decisions"] == r1["decisions"] and r0["decisions"][0] == [0, "lr_sweep", None]
    step, action, to = r0["decisions"][1]  # the mean loss blows up at the 12th step: the sweep stops there
    assert action == "rollback" and to == 0 and 12 <= step < 20
    assert r0["lr"] == r1["lr"] and r0["params_sha256"] == r1["params_sha256"]


@pytest.mark.slow
def test_spike_on_one_rank_gives_the_same_decision_on_both(tmp_path):
    r0, r1 = run_ddp("spike_on_rank0", tmp_path)
    assert r0["decisions"] == r1["decisions"]
    # 5000 on one rank for three steps: the mean spikes (logged), stays up, and is rolled back on both ranks
    assert [d[:2] for d in r0["decisions"]] == [[30, "none"], [32, "rollback"]]
    assert r0["params_sha256"] == r1["params_sha256"]


@pytest.mark.slow
def test_exhausted_rollbacks_stop_both_ranks_with_one_checkpoint(tmp_path):
    r0, r1 = run_ddp("always_nan_on_rank0", tmp_path)
    assert r0["decisions"] == r1["decisions"]
    assert [d[1] for d in r0["decisions"]] == ["rollback", "rollback", "stop"]
    assert r0["global_step"] == r1["global_step"] < 60
    checkpoints = list((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(checkpoints) == 1 and r0["checkpoint"] == r1["checkpoint"] == str(checkpoints[0])
    assert r0["params_sha256"] == r1["params_sha256"] and r0["finite"]


def test_the_gate_skips_a_nan_batch_of_one_rank_on_both_with_no_rollback(tmp_path):
    """A NaN in one rank's batch makes the all-reduced gradient NaN on both: the gate skips the update on both
    ranks at the same step (it scores the gradient norm, the same everywhere: no collective of its own), and the
    parameters stay identical."""
    ranks = run_ddp("gate_nan_on_rank1", tmp_path)
    assert ranks[0]["decisions"] == ranks[1]["decisions"] == [[25, "skip", None]]
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"] and all(r["finite"] for r in ranks)
