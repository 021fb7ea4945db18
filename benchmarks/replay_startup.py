"""How long ``lr-guard replay`` takes on a small CSV, from a fresh interpreter, against the interpreter alone.

    python benchmarks/replay_startup.py            # 5 runs of each; medians

A replay of a CSV imports neither torch nor Lightning (nor scipy), so it starts in well under a second; the
test suite checks the imports (``tests/test_replay.py::test_replay_of_a_csv_imports_neither_lightning_nor_torch``),
this script the time. The last line is one JSON object: ``replay_csv_s``, ``python_s`` and their difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CSV = "lr_guard/data/curves/criteo_dlrm_warmup_divergence_inf_nan_algoperf.csv"  # 100 rows


def wall(args: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    python = wall(["-c", "pass"], args.repeats)
    replay = wall(["-m", "lr_guard.replay", "replay", CSV], args.repeats)
    result = {"replay_csv_s": round(replay, 3), "python_s": round(python, 3), "replay_own_s": round(replay - python, 3)}
    print(f"lr-guard replay of a 100-row CSV: {replay:.3f} s (the interpreter alone: {python:.3f} s)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
