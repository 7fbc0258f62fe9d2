"""The one prepared GPU check (run it when a session has a CUDA machine; CI never needs a GPU).

    python benchmarks/gpu_check.py

1. Correctness: a few configurations trained as stacked models on CUDA and on the CPU agree per epoch
   (TF32 off, first 5 epochs, 1e-3 relative: GPU reductions sum in another order).
2. Speed: model-epochs per second of the stacked trainer on CUDA for R = 1, 24, 64 at a few sizes.
Exits non-zero when no GPU is present or a configuration disagrees.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from butter_pipeline.sweep import parse_spec, plan_runs
from butter_pipeline.vtrain import train_group

CONFIGS = [
    {"dataset": "wine_quality_white", "size": 2048, "depth": 4, "learning_rate": 1e-3},
    {"dataset": "529_pollen", "size": 4096, "depth": 5, "shape": "rectangle_residual", "label_noise": 0.1},
    {"dataset": "adult", "size": 16384, "depth": 3, "optimizer": "rmsprop", "momentum": 0.9},
    {"dataset": "mnist", "size": 65536, "depth": 3, "kernel_regularizer": {"type": "l2", "strength": 1e-4}},
]


def runs_for(grid: dict, members: int, epochs: int):
    spec = parse_spec({"name": "gpu", "repetitions": members, "grid": {**grid, "epochs": epochs}}, source="gpu")
    return list(plan_runs(spec))


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    failures = 0
    for grid in CONFIGS:
        runs = runs_for(grid, 3, 5)
        on_gpu, on_cpu = train_group(runs, device=cuda), train_group(runs, device=cpu)
        worst = max(
            float(np.max(np.abs(g.history[k] - c.history[k]) / np.maximum(np.abs(c.history[k]), 1e-6)))
            for g, c in zip(on_gpu, on_cpu, strict=True)
            for k in c.history
            if not k.endswith("accuracy")
        )
        ok = worst < 1e-3
        failures += not ok
        print(f"{grid['dataset']:>20} {'agree' if ok else 'DISAGREE'}: worst relative difference {worst:.2e}")
    print("\n| size | R | model-epochs/s on CUDA |\n|---|---|---|")
    for size in (2**10, 2**14, 2**18, 2**20):
        for members in (1, 24, 64):
            runs = runs_for({"dataset": "connect_4", "size": size, "depth": 4}, members, 2)
            tick = time.perf_counter()
            results = train_group(runs, device=cuda)
            torch.cuda.synchronize()
            print(
                f"| 2^{size.bit_length() - 1} | {members} | {members * 2 / (time.perf_counter() - tick):.3g} |",
                flush=True,
            )
            del results
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
