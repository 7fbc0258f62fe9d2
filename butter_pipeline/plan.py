"""Planning: which runs of a sweep still need training, and how to cut them into chunks of work.

"Done" is read from the store, never from orchestrator state: a run is done when it is in the published
``runs`` table or staged and waiting for the publisher.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from butter_pipeline.publish import published_run_ids
from butter_pipeline.stage import read_staged, staged_units
from butter_pipeline.store import Store
from butter_pipeline.sweep import Run, SweepSpec, expand, plan_runs
from butter_pipeline.tasks import manifest

MAX_RUNS_PER_CHUNK = 64


@dataclass(frozen=True)
class SweepPlan:
    experiments: int
    runs: int
    epochs: int
    done: int  # runs already published or staged
    todo: list[Run]


def done_run_ids(store: Store) -> set[str]:
    """Runs published in ``runs`` plus runs staged for the publisher."""
    done = published_run_ids(store)
    for unit in staged_units(store):
        runs, _ = read_staged(store, unit)
        done.update(runs.column("run_id").to_pylist())
    return done


# Cost model of the reference loop on one CPU core, measured here (docs/performance.md): a fixed cost per
# minibatch step, which dominates for small networks, plus the arithmetic at a sustained rate.
STEP_SECONDS = 1.5e-3
FLOPS_PER_SECOND = 20e9


def task_rows(dataset: str) -> int:
    entries = manifest()[dataset]
    return sum(e.rows for e in entries if e.features) if dataset == "mnist" else entries[0].rows


def estimated_seconds(run: Run) -> float:
    """Rough single-core seconds to train ``run``: steps x step cost + 6 P x examples (+ evaluation) / rate."""
    spec = run.experiment
    rows = task_rows(spec.dataset)
    train_rows = rows - math.ceil(spec.test_split * rows)
    steps = math.ceil(train_rows / spec.batch_size)
    flops = 6.0 * spec.size * train_rows + 2.0 * spec.size * rows
    return spec.epochs * (steps * STEP_SECONDS + flops / FLOPS_PER_SECOND)


def make_plan(spec: SweepSpec, done: set[str], *, max_runs: int | None = None) -> SweepPlan:
    """Expand ``spec``, drop the runs in ``done``, keep at most ``max_runs`` of the rest (in grid order)."""
    experiments = sum(1 for _ in expand(spec))
    todo, total, epochs, already = [], 0, 0, 0
    for run in plan_runs(spec):
        total += 1
        epochs += run.experiment.epochs
        if run.run_id in done:
            already += 1
        elif max_runs is None or len(todo) < max_runs:
            todo.append(run)
    return SweepPlan(experiments=experiments, runs=total, epochs=epochs, done=already, todo=todo)


def chunk_runs(runs: Iterable[Run], *, workers: int) -> list[list[Run]]:
    """Cut runs into balanced chunks: about four per worker, each at most ``MAX_RUNS_PER_CHUNK`` runs.

    Runs are dealt heaviest first to the lightest chunk (longest-processing-time rule) so that chunks
    finish together; runs of one dataset tend to share a chunk, so a worker loads few datasets.
    """
    ordered = sorted(runs, key=lambda r: (-estimated_seconds(r), r.experiment.dataset, r.run_id))
    if not ordered:
        return []
    count = max(min(len(ordered), 4 * max(workers, 1)), -(-len(ordered) // MAX_RUNS_PER_CHUNK))
    chunks: list[list[Run]] = [[] for _ in range(count)]
    loads = [0.0] * count
    for run in ordered:
        lightest = min(range(count), key=lambda i: (loads[i], len(chunks[i])))
        chunks[lightest].append(run)
        loads[lightest] += estimated_seconds(run)
    return [chunk for chunk in chunks if chunk]
