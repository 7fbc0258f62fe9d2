"""What a worker does with a chunk of runs: train each, record it, validate it and stage it.

Plain Python with no orchestrator import: the Prefect task in ``flows/`` calls ``run_chunk`` on a Dask
worker, and tests call it directly. A run already staged (a re-executed task) is skipped.
"""

from __future__ import annotations

import os
from collections import Counter
from datetime import UTC, datetime

import torch

from butter_pipeline.record import epochs_table, runs_table
from butter_pipeline.stage import is_staged, stage_result
from butter_pipeline.store import open_store
from butter_pipeline.sweep import Run
from butter_pipeline.tasks import load_task
from butter_pipeline.train import RunResult, failed_result, train_run


def _set_threads(threads: int | None) -> None:
    # One single-threaded worker per core beats one multi-threaded worker on small networks (design.md).
    chosen = threads or int(os.environ.get("BUTTER_TORCH_THREADS", "1"))
    if torch.get_num_threads() != chosen:
        torch.set_num_threads(chosen)


def train_safely(run: Run) -> RunResult:
    """Train ``run``; an exception inside training is recorded as a ``failed`` run, not raised."""
    started = datetime.now(UTC)
    task = load_task(run.experiment.dataset)  # a missing or corrupt dataset file is the user's to fix: raise
    try:
        return train_run(run, task)
    except (RuntimeError, ValueError, ArithmeticError, MemoryError) as exc:
        return failed_result(run, task, exc, started)


def run_chunk(store_uri: str, runs: list[Run], *, threads: int | None = None) -> dict[str, int]:
    """Train, validate and stage every run of a chunk; returns counts by outcome and by run status."""
    _set_threads(threads)
    store = open_store(store_uri, create=False)
    counts: Counter[str] = Counter()
    for run in runs:
        if is_staged(store, run.run_id):
            counts["already-staged"] += 1
            continue
        result = train_safely(run)
        outcome = stage_result(store, run.run_id, runs_table([result]), epochs_table([result]))
        counts[outcome.status] += 1
        counts[f"status:{result.status}"] += 1
    return dict(counts)
