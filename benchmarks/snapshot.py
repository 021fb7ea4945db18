"""How fast lr_guard snapshots and restores a training state, against a raw copy of the same bytes.

    python benchmarks/snapshot.py                      # 10 MB, 100 MB, 1 GB, 3 GB, 8 GB of state, as memory allows
    python benchmarks/snapshot.py --sizes-mb 10 100 3000
    python benchmarks/snapshot.py --sharded --sizes-mb 10 100  # 2 CPU ranks (gloo), the model under fully_shard

A state of S bytes is a model of S/3 bytes of fp32 parameters with AdamW's two moments (3 x parameters). For
each size: ``take_snapshot`` into a spare snapshot's reused buffers (the guard's steady state), a fresh
``take_snapshot`` (first use, allocating), ``Snapshot.restore``, and a raw copy of one flat tensor of the same
bytes into a preallocated buffer -- pinned host memory on a GPU (the device-to-host ceiling), plain memory on CPU
(the memcpy ceiling). Medians of several repetitions; GB/s = bytes / time.

The last line is one JSON object: ``snapshot_gbps``, ``restore_gbps``, ``pinned_copy_gbps`` (for the largest
size), and the per-size figures.

``--sharded``: the same state sharded by torch's ``fully_shard`` (FSDP2) over 2 CPU processes (gloo), each
snapshotting and restoring its own shard through :class:`~lr_guard.actions.sharded_state_io.ShardedStateIO`.
Per rank and size: the bytes of the rank's shard (its local parameters and AdamW moments), the bytes its
snapshot holds, their ratio, and the snapshot's and the restore's time. The last line is one JSON object with a
row per rank and size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lr_guard.actions import take_snapshot


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        if getattr(out, "ready", None) is not None:
            out.ready.synchronize()  # the benchmark waits for the side-stream copy; the guard does not
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def state_of(megabytes: float, device: str) -> tuple[nn.Module, torch.optim.Optimizer, int]:
    n = int(megabytes * 1e6 / 4 / 3)
    width = 4096
    rows = max(1, n // width)
    model = nn.Linear(width, rows, bias=False).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.weight.grad = torch.ones_like(model.weight)
    opt.step()
    nbytes = 3 * model.weight.numel() * 4
    return model, opt, nbytes


def available_host_bytes() -> int:
    """Host memory available to a new process (Linux's MemAvailable; free pages elsewhere)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fits(megabytes: float, device: str) -> bool:
    """Whether a state of this size can be measured here. On CPU about 5.5 copies of it are alive at once (the
    state and its gradient, two snapshots, the raw copy's source and destination); with a GPU about 3 pinned
    copies on the host and 2.5 on the device. A margin on top."""
    need = megabytes * 1e6
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return 4 * need < available_host_bytes() and 3 * need < free
    return 6.5 * need < available_host_bytes()


def measure(megabytes: float, device: str, repeats: int) -> dict[str, float]:
    model, opt, nbytes = state_of(megabytes, device)
    fresh = timed(lambda: take_snapshot(0, model, [opt], []), device, repeats)
    spare = take_snapshot(0, model, [opt], [])
    reused = timed(lambda: take_snapshot(1, model, [opt], [], reuse=spare), device, repeats)
    snap = take_snapshot(2, model, [opt], [])
    restore = timed(lambda: snap.restore(model, [opt], []), device, repeats)
    flat = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=device == "cuda")
    raw = timed(lambda: dst.copy_(flat, non_blocking=True), device, repeats)
    gb = nbytes / 1e9
    row = {
        "state_mb": nbytes / 1e6,
        "snapshot_gbps": gb / reused,
        "snapshot_fresh_gbps": gb / fresh,
        "restore_gbps": gb / restore,
        "pinned_copy_gbps": gb / raw,
        "snapshot_ms": 1e3 * reused,
        "restore_ms": 1e3 * restore,
    }
    print(
        f"{device:<5}{row['state_mb']:>9.0f} MB  snapshot {row['snapshot_ms']:8.1f} ms ({row['snapshot_gbps']:6.2f} "
        f"GB/s; fresh {row['snapshot_fresh_gbps']:6.2f})  restore {row['restore_ms']:8.1f} ms "
        f"({row['restore_gbps']:6.2f} GB/s)  raw copy {row['pinned_copy_gbps']:6.2f} GB/s  -> snapshot at "
        f"{100 * row['snapshot_gbps'] / row['pinned_copy_gbps']:5.1f}% of the raw copy"
    )
    return row


def sharded_row(rank: int, mesh: Any, megabytes: float, repeats: int) -> dict[str, float]:
    """One rank's figures for one state size under ``fully_shard``."""
    from torch.distributed.fsdp import fully_shard

    from lr_guard.actions.sharded_state_io import SHARDED_STATE
    from lr_guard.actions.snapshot import tree_nbytes

    model, _, full_bytes = state_of(megabytes, "cpu")
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # over the sharded parameters
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    shard_bytes = tree_nbytes(SHARDED_STATE.model_state(model)) + tree_nbytes(SHARDED_STATE.optimizer_state(opt))
    spare = take_snapshot(0, model, [opt], [], state_io=SHARDED_STATE)
    reused = timed(lambda: take_snapshot(1, model, [opt], [], reuse=spare, state_io=SHARDED_STATE), "cpu", repeats)
    snap = take_snapshot(2, model, [opt], [], state_io=SHARDED_STATE)
    restore = timed(lambda: snap.restore(model, [opt], [], state_io=SHARDED_STATE), "cpu", repeats)
    row = {
        "rank": rank,
        "state_mb": full_bytes / 1e6,
        "shard_mb": shard_bytes / 1e6,
        "snapshot_mb": snap.nbytes / 1e6,
        "snapshot_over_shard": snap.nbytes / shard_bytes,
        "snapshot_ms": 1e3 * reused,
        "restore_ms": 1e3 * restore,
    }
    print(
        f"rank {rank} {row['state_mb']:>9.1f} MB state  shard {row['shard_mb']:9.3f} MB  snapshot "
        f"{row['snapshot_mb']:9.3f} MB ({row['snapshot_over_shard']:.4f} x the shard)  snapshot "
        f"{row['snapshot_ms']:8.2f} ms  restore {row['restore_ms']:8.2f} ms",
        flush=True,
    )
    return row


def measure_sharded(rank: int, world: int, sizes_mb: list[float], repeats: int, port: int, out: str) -> None:
    """One rank of ``--sharded``: for each size, snapshot and restore this rank's shard; rows to ``out``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    rows = [sharded_row(rank, mesh, megabytes, repeats) for megabytes in sizes_mb]
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(rows, f)
    dist.destroy_process_group()


def main_sharded(sizes_mb: list[float], repeats: int) -> dict[str, Any]:
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    world = 2
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "rows")
        mp.spawn(measure_sharded, args=(world, sizes_mb, repeats, port, out), nprocs=world, join=True)
        rows = []
        for rank in range(world):
            with open(f"{out}.rank{rank}.json") as f:
                rows.extend(json.load(f))
    summary = {"device": "cpu", "sharded_ranks": world, "sizes": [{k: round(v, 4) for k, v in r.items()} for r in rows]}
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes-mb",
        type=float,
        nargs="+",
        default=None,
        help="state sizes in MB (default: 10 100 1000 3000 8000, those that fit in memory)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sharded", action="store_true", help="2 CPU ranks, the state under fully_shard (FSDP2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.sharded:
        return main_sharded(args.sizes_mb or [10.0, 100.0], args.repeats)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for mb in args.sizes_mb or (10, 100, 1000, 3000, 8000):
        if args.sizes_mb is None and not fits(mb, device):
            print(f"{device:<5}{mb:>9.0f} MB  skipped: not enough free memory here")
            continue
        rows.append(measure(mb, device, args.repeats))
    largest = rows[-1]
    summary = {
        "device": device,
        "snapshot_gbps": round(largest["snapshot_gbps"], 3),
        "restore_gbps": round(largest["restore_gbps"], 3),
        "pinned_copy_gbps": round(largest["pinned_copy_gbps"], 3),
        "sizes": [{k: round(v, 3) for k, v in row.items()} for row in rows],
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
