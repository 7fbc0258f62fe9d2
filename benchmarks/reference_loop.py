"""Speed of butter's reference trainer against a plain PyTorch loop, side by side in one process.

    python benchmarks/reference_loop.py            # figures go in docs/performance.md

For each (task, size): model-epochs per second and milliseconds per minibatch step of
``butter_pipeline.train.train_run`` (Keras update rules, ten metrics on both splits every epoch) and of a
plain loop (``nn.Linear`` layers, ``torch.optim.Adam``, loss only, no evaluation), on one thread, median
of repeats. The ratio is the price of recording BUTTER's metrics with the reference (one-run) trainer.
"full train pass" is what an extra evaluation of the whole training split after each epoch would add to
the epoch's time (the candidate "full-pass train metrics" of issue 3).
"""

from __future__ import annotations

import math
import statistics
import time

import torch
from torch import nn

from butter_pipeline.metrics import data_loss
from butter_pipeline.nets import MLP
from butter_pipeline.sweep import parse_spec, plan_runs
from butter_pipeline.tasks import load_task
from butter_pipeline.train import evaluate, train_run

CASES = [("529_pollen", 1024), ("adult", 1024), ("adult", 16384), ("mnist", 65536), ("connect_4", 262144)]
EPOCHS, REPEATS, BATCH = 2, 3, 256


def plain_loop(task, widths: tuple[int, ...], epochs: int) -> float:
    """Seconds for ``epochs`` epochs of the simplest faithful loop: no metrics, no evaluation."""
    layers, fan_in = [], task.n_in
    for index, width in enumerate(widths):
        layers.append(nn.Linear(fan_in, width))
        if index < len(widths) - 1:
            layers.append(nn.ReLU())
        fan_in = width
    model = nn.Sequential(*layers)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, eps=1e-7)
    n_train = len(task.x) - math.ceil(0.2 * len(task.x))
    x, y = torch.from_numpy(task.x[:n_train].copy()), torch.from_numpy(task.y[:n_train].copy())
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n_train)
        for begin in range(0, n_train, BATCH):
            idx = order[begin : begin + BATCH]
            loss = data_loss(model(x[idx]), y[idx], task.kind)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(1)
    print(
        "| task | size | params | steps/epoch | butter ms/step | plain ms/step | butter/plain time | "
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
        ours, evals, plain = [], [], []
        for _ in range(REPEATS):
            result = train_run(run, task)
            ours.append(result.train_seconds + result.eval_seconds)
            evals.append(result.eval_seconds / (result.train_seconds + result.eval_seconds))
            plain.append(plain_loop(task, result.layout.widths, EPOCHS))
        steps = math.ceil(result.train_rows / BATCH)
        model = MLP(result.layout)
        x, y = torch.from_numpy(task.x.copy()), torch.from_numpy(task.y.copy())
        tick = time.perf_counter()
        evaluate(model, x[: result.train_rows], y[: result.train_rows], task.kind, 0.0)
        train_pass = time.perf_counter() - tick
        mine, base = statistics.median(ours), statistics.median(plain)
        flops = EPOCHS * (
            6 * result.layout.num_parameters * result.train_rows + 2 * result.layout.num_parameters * result.test_rows
        )
        print(
            f"| {dataset} | {size} | {result.layout.num_parameters} | {steps} | "
            f"{1000 * mine / (EPOCHS * steps):.2f} | {1000 * base / (EPOCHS * steps):.2f} | {mine / base:.2f} | "
            f"{statistics.median(evals):.1%} | +{train_pass / (mine / EPOCHS):.0%} | {flops / mine / 1e9:.1f} |"
        )


if __name__ == "__main__":
    main()
