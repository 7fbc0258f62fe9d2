"""The reference (one-run) trainer against the plain PyTorch loop, and what extra passes would cost.

    python benchmarks/reference_loop.py            # figures go in docs/performance.md

For each (task, size): milliseconds per minibatch step of ``butter_pipeline.train.train_run`` (Keras
update rules, ten metrics on both splits every epoch) and of the plain loop in ``baseline.py``, on one
thread, median of repeats; the share of butter's epoch spent evaluating the test split; and "full train
pass": what an extra evaluation of the whole training split after each epoch would add to the epoch's time
(the candidate "full-pass train metrics" of issue 3).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from baseline import plain_epoch_seconds  # noqa: E402

from butter_pipeline.nets import MLP  # noqa: E402
from butter_pipeline.sweep import parse_spec, plan_runs  # noqa: E402
from butter_pipeline.tasks import load_task  # noqa: E402
from butter_pipeline.train import evaluate, train_run  # noqa: E402

CASES = [("529_pollen", 1024), ("adult", 1024), ("adult", 16384), ("mnist", 65536), ("connect_4", 262144)]
EPOCHS, REPEATS, BATCH = 2, 3, 256


def main() -> None:
    torch.set_num_threads(1)
    print(
        "| task | size | params | steps/epoch | butter ms/step | plain ms/step | butter/plain epoch time | "
        "eval share | full train pass | butter GFLOP/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dataset, size in CASES:
        spec = parse_spec(
            {"name": "bench", "repetitions": 1, "grid": {"dataset": dataset, "size": size, "epochs": EPOCHS}},
            source="benchmark",
        )
        run = next(iter(plan_runs(spec)))
        task = load_task(dataset)
        ours, evals, plain_train, plain_total = [], [], [], []
        for _ in range(REPEATS):
            result = train_run(run, task)
            ours.append((result.train_seconds + result.eval_seconds) / EPOCHS)
            evals.append(result.eval_seconds / (result.train_seconds + result.eval_seconds))
            train_s, eval_s = plain_epoch_seconds(task, result.layout.widths, BATCH, epochs=EPOCHS)
            plain_train.append(train_s)
            plain_total.append(train_s + eval_s)
        steps = math.ceil(result.train_rows / BATCH)
        model = MLP(result.layout)
        x, y = torch.from_numpy(task.x.copy()), torch.from_numpy(task.y.copy())
        tick = time.perf_counter()
        evaluate(model, x[: result.train_rows], y[: result.train_rows], task.kind, 0.0)
        train_pass = time.perf_counter() - tick
        mine, plain_step = statistics.median(ours), statistics.median(plain_train) / steps
        flops = (
            6 * result.layout.num_parameters * result.train_rows + 2 * result.layout.num_parameters * result.test_rows
        )
        print(
            f"| {dataset} | {size} | {result.layout.num_parameters} | {steps} | "
            f"{1000 * result.train_seconds / (EPOCHS * steps):.2f} | {1000 * plain_step:.2f} | "
            f"{mine / statistics.median(plain_total):.2f} | {statistics.median(evals):.1%} | "
            f"+{train_pass / mine:.0%} | "
            f"{flops / mine / 1e9:.1f} |"
        )


if __name__ == "__main__":
    main()
