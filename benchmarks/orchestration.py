"""Orchestration overhead: a sweep of 500 small runs end to end on the local stack, against the sum of the
same runs' pure training time in one process.

    python benchmarks/orchestration.py                 # 500 runs, 150 epochs, 2 Dask workers
    python benchmarks/orchestration.py --epochs 20 --workers 1

"Pure training" is the trainer alone (``vtrain.train_runs`` on each stacked-model group, one thread, no
Prefect, no Dask, no store). "End to end" is ``infra/local/up.sh`` in a temporary folder, then the `sweep`
deployment run from the Prefect CLI and watched to the end: the worker picks the flow run up, plans,
trains on the Dask workers, stages to S3 (SeaweedFS), publishes and summarizes. The ratio compares
core-seconds: end-to-end wall time x Dask workers / pure training seconds (1.0: no overhead at all).
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from butter_pipeline.sweep import parse_spec, plan_runs
from butter_pipeline.vtrain import group_runs, train_runs

LOCAL = Path(__file__).resolve().parents[1] / "infra" / "local"
GRID = {
    "dataset": ["529_pollen", "wine_quality_white", "201_pol", "nursery", "splice"],
    "shape": "rectangle",
    "size": [1024, 4096],
    "depth": [2, 3, 4, 5, 6],
    "learning_rate": 0.001,
    "batch_size": 256,
}
REPETITIONS = 10  # 5 x 2 x 5 = 50 experiments x 10 = 500 runs


def _sweep_toml(epochs: int) -> str:
    lines = ['name = "overhead"', f"repetitions = {REPETITIONS}", "", "[grid]"]
    for key, value in GRID.items():
        lines.append(f"{key} = {value!r}".replace("'", '"'))
    lines.append(f"epochs = {epochs}")
    return "\n".join(lines) + "\n"


def pure_training_seconds(sweep_file: Path) -> tuple[float, int]:
    """Seconds to train every run of the sweep in this process, one thread, group by group."""
    import tomllib

    spec = parse_spec(tomllib.loads(sweep_file.read_text()), source=str(sweep_file))
    torch.set_num_threads(1)
    runs = list(plan_runs(spec))
    started = time.perf_counter()
    for group in group_runs(runs):
        train_runs(group)
    return time.perf_counter() - started, len(runs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Sum of the training and evaluation seconds the workers recorded (each run holds its share of its group's)
_SUM_TRAINING = (
    "import os; from butter_pipeline.read import open_dataset; "
    "t = open_dataset(os.environ['BUTTER_STORE']).runs(columns=['train_seconds', 'eval_seconds'], to='pandas'); "
    "print(float((t.train_seconds + t.eval_seconds).sum()))"
)


def end_to_end_seconds(sweep_file: Path, state: Path, workers: int) -> tuple[float, str]:
    """Wall seconds of the `sweep` deployment run on a fresh local stack; also its `butter status` table."""
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        BUTTER_LOCAL_STATE=str(state),
        BUTTER_PREFECT_PORT=str(_free_port()),
        BUTTER_DASK_PORT=str(_free_port()),
        BUTTER_S3_PORT="19333",
        BUTTER_DASK_WORKERS=str(workers),
    )
    subprocess.run(["bash", str(LOCAL / "up.sh")], env=env, check=True, stdout=subprocess.DEVNULL)
    try:
        started = time.perf_counter()
        smoke = subprocess.run(
            ["bash", str(LOCAL / "smoke.sh"), str(sweep_file)], env=env, capture_output=True, text=True, check=True
        )
        wall = time.perf_counter() - started
        inside = subprocess.run(
            ["bash", "-c", f'. "{state}/env" && "{sys.executable}" -c "{_SUM_TRAINING}"'],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        print(f"training time recorded by the workers (sum over runs): {float(inside.stdout):.1f} s")
    finally:
        subprocess.run(["bash", str(LOCAL / "down.sh")], env=env, stdout=subprocess.DEVNULL)
    return wall, smoke.stdout.split("Flow run finished", 1)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes of the local stack")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="butter-overhead-") as folder:
        sweep_file = Path(folder) / "overhead.toml"
        sweep_file.write_text(_sweep_toml(args.epochs))
        pure, runs = pure_training_seconds(sweep_file)
        print(f"pure training: {runs} runs, {args.epochs} epochs each, {pure:.1f} s in one process (one thread)")
        wall, status = end_to_end_seconds(sweep_file, Path(folder) / "stack", args.workers)
        print(f"end to end on the local stack: {wall:.1f} s wall with {args.workers} Dask workers")
        print(f"overhead ratio (wall x workers / pure): {wall * args.workers / pure:.2f}")
        print(status.strip())
    print("command:", shlex.join([sys.executable, *sys.argv]))


if __name__ == "__main__":
    main()
