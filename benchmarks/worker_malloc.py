"""Training speed in a process started the way Dask's nanny starts workers (MALLOC_TRIM_THRESHOLD_=65536),
with and without ``execute.keep_buffers_mapped``, against a plain process; and two plain ones side by side.

    python benchmarks/worker_malloc.py            # median of 3 per case

Each case is a fresh child process that trains the same groups (wine_quality_white, rectangle, depth 3,
sizes 2^11 and 2^14, 4 stacked repetitions, 15 epochs, one thread) through ``vtrain.train_runs``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

CHILD = """
import sys, time, torch
torch.set_num_threads(1)
from butter_pipeline.execute import keep_buffers_mapped
if sys.argv[1] == "undo":
    assert keep_buffers_mapped()
from butter_pipeline.sweep import parse_spec, plan_runs
from butter_pipeline.vtrain import group_runs, train_runs
grid = {"dataset": "wine_quality_white", "shape": "rectangle", "size": [2048, 16384], "depth": 3, "epochs": 15}
runs = list(plan_runs(parse_spec({"name": "b", "repetitions": 4, "grid": grid}, source="benchmark")))
train_runs(group_runs(runs)[0][:1])  # warm-up: task loading and first allocations
started = time.perf_counter()
for group in group_runs(runs):
    train_runs(group)
print(time.perf_counter() - started)
"""
NANNY = {"MALLOC_TRIM_THRESHOLD_": "65536"}


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}
    return {**env, **extra}


def _seconds(mode: str, extra: dict[str, str], copies: int = 1) -> list[float]:
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, mode], env=_env(extra), stdout=subprocess.PIPE, text=True)
        for _ in range(copies)
    ]
    return [float(p.communicate()[0]) for p in procs]


def main() -> None:
    cases = {
        "plain process": lambda: _seconds("plain", {}),
        "MALLOC_TRIM_THRESHOLD_=65536 (as a Dask nanny starts workers)": lambda: _seconds("plain", NANNY),
        "the same, after keep_buffers_mapped()": lambda: _seconds("undo", NANNY),
        "two plain processes side by side (each)": lambda: _seconds("plain", {}, copies=2),
    }
    baseline = None
    for name, case in cases.items():
        times = [t for _ in range(3) for t in case()]
        median = statistics.median(times)
        baseline = baseline or median
        print(f"{name:66s} {median:6.2f} s  ({median / baseline:.2f}x)")


if __name__ == "__main__":
    main()
