"""Planning BUTTER's largest sweep: time and traced memory to count it and to stream it out in chunks.

    python benchmarks/planning.py                 # the primary sweep (851,760 runs)
    python benchmarks/planning.py --sweep 300_epoch --workers 8

Uses the library's own ``make_plan`` and ``stream_chunks``, as the sweep flow does. Timing and memory are
measured in two fresh processes (tracemalloc slows Python code several-fold, and both start cold); the
memory is the Python allocations made while each step runs, imports not counted.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import tracemalloc

from butter_pipeline import plan as planning
from butter_pipeline.sweep import load_spec


def _measure(sweep: str, workers: int, traced: bool) -> None:
    spec = load_spec(sweep)
    if traced:
        tracemalloc.start()
    started = time.perf_counter()
    counts = planning.make_plan(spec, set())
    count_seconds = time.perf_counter() - started
    count_peak = tracemalloc.get_traced_memory()[1] if traced else 0
    if traced:
        tracemalloc.reset_peak()
    started = time.perf_counter()
    target = planning.chunk_seconds(counts.todo_seconds, workers)
    runs = chunks = heavy = largest = 0
    for chunk in planning.stream_chunks(spec, set(), target_seconds=target):
        runs, chunks, heavy = runs + len(chunk.runs), chunks + 1, heavy + chunk.gpu
        largest = max(largest, len(chunk.runs))
    stream_seconds = time.perf_counter() - started
    if traced:
        stream_peak = tracemalloc.get_traced_memory()[1]
        print(f"count:  peak {count_peak / 2**20:.1f} MiB traced")
        print(f"stream: peak {stream_peak / 2**20:.1f} MiB traced")
        return
    print(f"sweep {spec.name}: {counts.experiments:,} experiments, {counts.runs:,} runs")
    print(f"count:  {count_seconds:.1f} s")
    print(
        f"stream: {stream_seconds:.1f} s; {runs:,} runs in {chunks:,} chunks ({heavy:,} for GPU workers), "
        f"at most {largest:,} runs per chunk"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="primary")
    parser.add_argument("--workers", type=int, default=64, help="cluster size the chunks are cut for")
    parser.add_argument("--child", choices=["timed", "traced"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _measure(args.sweep, args.workers, traced=args.child == "traced")
        return
    for mode in ("timed", "traced"):
        command = [sys.executable, __file__, "--sweep", args.sweep, "--workers", str(args.workers), "--child", mode]
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
