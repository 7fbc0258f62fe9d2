"""Throughput of butter's trainer (vectorized for R > 1) against a plain per-run PyTorch loop.

    python benchmarks/training.py           # the full matrix (about 20 minutes on 2 cores)
    python benchmarks/training.py --quick   # a few rows

Task connect_4 (126 inputs, 3 outputs, 54,046 training and 13,511 test rows), rectangles, Adam, one
thread, all in one process. Each configuration trains on a slice of the task sized to a few dozen steps
and the per-step and per-evaluated-row times are scaled to a full epoch of the real task (median of 3). For each
(size, depth, batch size, R): model-epochs per second, achieved GFLOP/s (6 x parameters x training
examples + 2 x parameters x test examples, per model-epoch), that as a fraction of the matrix-multiply
peak measured at the start, the share of an epoch spent evaluating, and the speedup in model-epochs per
second over the plain loop (``baseline.py``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from baseline import plain_epoch_seconds  # noqa: E402

from butter_pipeline.nets import layout_for  # noqa: E402
from butter_pipeline.sweep import parse_spec, plan_runs  # noqa: E402
from butter_pipeline.tasks import Task, load_task  # noqa: E402
from butter_pipeline.vtrain import train_group  # noqa: E402

DATASET = "connect_4"
EPOCHS = 1


def matmul_peak_gflops() -> float:
    """Best of 5 single-threaded 2048^3 float32 products."""
    a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
    best = math.inf
    for _ in range(5):
        tick = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - tick)
    return 2 * 2048**3 / best / 1e9


def sliced(task: Task, rows: int) -> Task:
    return Task(task.name, task.task_type, task.x[:rows], task.y[:rows])


REPEATS = 3  # each configuration is measured this many times (once when that takes over ~10 s); medians


def _steps(params: int, batch: int, members: int) -> int:
    """Training steps timed per configuration: enough to amortize per-epoch costs, bounded in time."""
    return max(3, min(60, int(4e9 / (6 * params * batch * members))))


def measure(task: Task, size: int, depth: int, batch: int, members: int) -> dict[str, float]:
    """Medians over ``REPEATS`` of ``measure_once``."""
    params = layout_for("rectangle", size, depth, task.n_in, task.n_out).num_parameters
    heavy = 6 * params * batch * members * _steps(params, batch, members) > 3e11
    rows = [measure_once(task, size, depth, batch, members) for _ in range(1 if heavy else REPEATS)]
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def measure_once(task: Task, size: int, depth: int, batch: int, members: int) -> dict[str, float]:
    layout = layout_for("rectangle", size, depth, task.n_in, task.n_out)
    params = layout.num_parameters
    steps = _steps(params, batch, members)
    small = sliced(task, math.ceil(steps * batch / 0.8) + 1)
    grid = {"dataset": DATASET, "size": size, "depth": depth, "batch_size": batch, "epochs": EPOCHS}
    runs = list(plan_runs(parse_spec({"name": "bench", "repetitions": members, "grid": grid}, source="bench")))
    result = train_group(runs, small)[0]
    stack = result.vector_width
    step_seconds = result.train_seconds * stack / (EPOCHS * math.ceil(result.train_rows / batch))
    eval_row_seconds = result.eval_seconds * stack / (EPOCHS * result.test_rows)
    n_test = math.ceil(0.2 * len(task.x))
    n_train = len(task.x) - n_test
    train_time = math.ceil(n_train / batch) * step_seconds
    eval_time = n_test * eval_row_seconds
    epoch = (train_time + eval_time) * members / stack  # R = 1 trains alone: members == stack
    flops = members * (6 * params * n_train + 2 * params * n_test)
    base_train, base_eval = plain_epoch_seconds(small, layout.widths, batch, epochs=EPOCHS)
    base_epoch = (
        math.ceil(n_train / batch) * base_train / math.ceil(len(small.x[math.ceil(0.2 * len(small.x)) :]) / batch)
    )
    base_epoch += base_eval * n_test / math.ceil(0.2 * len(small.x))
    return {
        "params": params,
        "model_epochs_per_s": members / epoch,
        "gflops": flops / epoch / 1e9,
        "eval_share": eval_time / (train_time + eval_time),
        "speedup": (members / epoch) / (1 / base_epoch),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = load_task(DATASET)
    sizes = [2**7, 2**12, 2**18] if args.quick else [2**k for k in range(7, 21)]
    depths = [4] if args.quick else [2, 4, 8]
    members_list = [1, 24] if args.quick else [1, 8, 24, 64]
    peak = statistics.median(matmul_peak_gflops() for _ in range(3))
    print(f"matrix-multiply peak (1 thread, 2048^3 float32): {peak:.1f} GFLOP/s\n")
    print("| size | depth | batch | R | params | model-epochs/s | GFLOP/s | of peak | eval share | speedup vs plain |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        for depth in depths:
            for batch in (32, 256):
                for members in members_list:
                    row = measure(task, size, depth, batch, members)
                    print(
                        f"| 2^{int(math.log2(size))} | {depth} | {batch} | {members} | {row['params']} | "
                        f"{row['model_epochs_per_s']:.3g} | {row['gflops']:.1f} | {row['gflops'] / peak:.0%} | "
                        f"{row['eval_share']:.0%} | {row['speedup']:.1f}x |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
