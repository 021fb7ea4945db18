"""How fast lr_guard snapshots and restores a training state, against a raw copy of the same bytes.

    python benchmarks/snapshot.py                      # 10 MB, 100 MB, 1 GB, 3 GB, 8 GB of state, as memory allows
    python benchmarks/snapshot.py --sizes-mb 10 100 3000

A state of S bytes is a model of S/3 bytes of fp32 parameters with AdamW's two moments (3 x parameters). For
each size: ``take_snapshot`` into a spare snapshot's reused buffers (the guard's steady state), a fresh
``take_snapshot`` (first use, allocating), ``Snapshot.restore``, and a raw copy of one flat tensor of the same
bytes into a preallocated buffer -- pinned host memory on a GPU (the device-to-host ceiling), plain memory on CPU
(the memcpy ceiling). Medians of several repetitions; GB/s = bytes / time.

The last line is one JSON object: ``snapshot_gbps``, ``restore_gbps``, ``pinned_copy_gbps`` (for the largest
size), and the per-size figures.
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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
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
