"""What a worker does with a chunk of runs: train them (stacked where they share an architecture), record,
validate and stage each trained group.

Plain Python with no orchestrator import: the Prefect task in ``flows/`` calls ``run_chunk`` on a Dask
worker, and tests call it directly. A staged unit holds one trained group; its id is a hash of its run
ids, so a re-executed task (Dask re-runs the tasks of a dead worker) finds it staged and trains nothing.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
from collections import Counter

import torch

from butter_pipeline.checkpoint import Checkpoints, every_epochs
from butter_pipeline.record import epochs_table, runs_table
from butter_pipeline.retry import retrying
from butter_pipeline.settings import setting
from butter_pipeline.stage import StageOutcome, is_staged, stage_result
from butter_pipeline.store import Store, open_store
from butter_pipeline.sweep import Run
from butter_pipeline.train import RunResult
from butter_pipeline.validate import find_problems
from butter_pipeline.vtrain import group_runs, train_runs

# glibc's mallopt parameters, and the values its dynamic rule settles at on 64-bit Linux
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_BYTES, _TRIM_THRESHOLD_BYTES = 32 << 20, 64 << 20


def keep_buffers_mapped() -> bool:
    """Undo a fixed ``MALLOC_TRIM_THRESHOLD_`` in this process; True when there was one to undo.

    Dask's nanny starts every worker with MALLOC_TRIM_THRESHOLD_=65536, which also pins glibc's mmap
    threshold at 128 KiB: torch's per-step buffers are then mapped and unmapped each time, and training ran
    1.6-1.8x slower in such a process here (docs/performance.md). Setting both thresholds to where glibc's
    dynamic rule would have taken them restores the speed, whatever started the worker.
    """
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): nothing to undo
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
    )


def _prepare_process(threads: int | None) -> None:
    # One single-threaded worker per core beats one multi-threaded worker on small networks (design.md).
    chosen = threads or int(setting("BUTTER_TORCH_THREADS"))
    if torch.get_num_threads() != chosen:
        torch.set_num_threads(chosen)
    keep_buffers_mapped()


def unit_id(runs: list[Run]) -> str:
    """The staged unit's name: stable for the same set of runs."""
    ids = ",".join(sorted(run.run_id for run in runs))
    return "u" + hashlib.sha256(ids.encode()).hexdigest()[:23]


def stage_results(store: Store, unit: str, results: list[RunResult]) -> list[StageOutcome]:
    """Stage ``results`` as one unit; results that break the contract are quarantined one by one."""
    runs, epochs = runs_table(results), epochs_table(results)
    if not find_problems(runs, epochs):
        return [stage_result(store, unit, runs, epochs)]
    outcomes, good = [], []
    for result in results:  # find the culprits; the rest is still staged together
        single_runs, single_epochs = runs_table([result]), epochs_table([result])
        if find_problems(single_runs, single_epochs):
            outcomes.append(stage_result(store, result.run.run_id, single_runs, single_epochs))
        else:
            good.append(result)
    if good:
        outcomes.append(stage_result(store, unit_id([r.run for r in good]), runs_table(good), epochs_table(good)))
    return outcomes


def run_attempts() -> int:
    """How many times a run that raises is trained before it is recorded as ``failed``."""
    return int(setting("BUTTER_RUN_ATTEMPTS"))


def train_with_retries(group: list[Run], attempts: int, checkpoints: Checkpoints | None = None) -> list[RunResult]:
    """Train ``group``; runs that fail are trained again, alone, up to ``attempts`` times in all.

    A failure is usually transient on a shared machine (memory pressure, a device reset); a run that keeps
    failing is recorded as ``failed`` with its last error and the number of attempts, and the sweep goes on.
    """
    results = train_runs(group, checkpoints=checkpoints)
    for attempt in range(2, attempts + 1):
        retry = [i for i, result in enumerate(results) if result.status == "failed"]
        if not retry:
            break
        for i in retry:  # alone: a run that keeps failing must not take its stacked-model mates with it
            [results[i]] = train_runs([results[i].run], checkpoints=checkpoints)
            results[i].attempts = attempt
    return results


def run_chunk(store_uri: str, runs: list[Run], *, threads: int | None = None) -> dict[str, int]:
    """Train, validate and stage every run of a chunk; returns counts of runs by outcome and by status."""
    _prepare_process(threads)
    store = open_store(store_uri, create=False)
    attempts = run_attempts()
    checkpoints = Checkpoints(store, every_epochs())
    counts: Counter[str] = Counter()
    for group in group_runs(runs):
        unit = unit_id(group)
        if retrying(f"store {store.uri}: looking for unit {unit}", is_staged, store, unit):
            counts["already-staged"] += len(group)
            continue
        results = train_with_retries(group, attempts, checkpoints)
        # the trained results are only in memory: an outage of the store delays them, never loses them
        for outcome in retrying(f"store {store.uri}: staging unit {unit}", stage_results, store, unit, results):
            counts[outcome.status] += outcome.runs
        counts.update(f"status:{result.status}" for result in results)
    return dict(counts)
