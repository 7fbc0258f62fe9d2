"""Planning: which runs of a sweep still need training, and how to cut them into chunks of work.

"Done" is read from the store, never from orchestrator state: a run is done when it is in the published
``runs`` table or staged and waiting for the publisher.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

from butter_pipeline.ids import run_id, seed_of
from butter_pipeline.nets import layout_for
from butter_pipeline.publish import published_run_ids
from butter_pipeline.stage import StagedFileDamaged, quarantine_staged, staged_run_ids, staged_units
from butter_pipeline.store import Store
from butter_pipeline.sweep import Experiment, Run, SweepSpec, expand
from butter_pipeline.tasks import TASK_FACTS, manifest
from butter_pipeline.vtrain import group_runs


@dataclass(frozen=True)
class SweepPlan:
    experiments: int
    runs: int
    epochs: int  # run-epochs of the whole sweep
    done: int  # runs already published or staged
    rejected_experiments: int  # experiments whose closest network is more than 20 % off target
    todo_seconds: float  # estimated single-core seconds for the runs still to train

    @property
    def todo_runs(self) -> int:
        return self.runs - self.done


def done_run_ids(store: Store) -> set[str]:
    """Runs published in ``runs`` plus runs staged for the publisher."""
    done = set(published_run_ids(store).to_pylist())
    for unit in staged_units(store):
        try:
            done.update(staged_run_ids(store, unit))  # the runs file only: epochs can be large
        except StagedFileDamaged as exc:  # not done: quarantined now, so that this sweep trains it again
            quarantine_staged(store, unit, str(exc))
    return done


# Cost model of the reference loop on one CPU core, measured here (docs/performance.md): a fixed cost per
# minibatch step, which dominates for small networks, plus the arithmetic at a sustained rate.
STEP_SECONDS = 1.5e-3
FLOPS_PER_SECOND = 20e9


def task_rows(dataset: str) -> int:
    entries = manifest()[dataset]
    return sum(e.rows for e in entries if e.features) if dataset == "mnist" else entries[0].rows


def estimated_seconds(experiment: Experiment) -> float:
    """Rough single-core seconds to train one run: steps x step cost + 6 P x examples (+ evaluation) / rate."""
    rows = task_rows(experiment.dataset)
    train_rows = rows - math.ceil(experiment.test_split * rows)
    steps = math.ceil(train_rows / experiment.batch_size)
    flops = 6.0 * experiment.size * train_rows + 2.0 * experiment.size * rows
    return experiment.epochs * (steps * STEP_SECONDS + flops / FLOPS_PER_SECOND)


@cache
def _conformant(dataset: str, shape: str, size: int, depth: int) -> bool:
    _, n_in, n_out, _, _ = TASK_FACTS[dataset]  # the widths only: loading the data would cost seconds
    return layout_for(shape, size, depth, n_in, n_out).conformant


def make_plan(spec: SweepSpec, done: set[str] | frozenset[str]) -> SweepPlan:
    """Count ``spec``'s experiments, runs and epochs, the runs in ``done`` and the cost of the rest.

    Counts only (fast enough for BUTTER's largest sweeps); ``stream_chunks`` hands out the runs themselves.
    """
    experiments = epochs = runs = already = rejected = 0
    seconds = 0.0
    reps = spec.repetitions
    for experiment in expand(spec):
        experiments += 1
        runs += reps
        epochs += reps * experiment.epochs
        conformant = _conformant(experiment.dataset, experiment.shape, experiment.size, experiment.depth)
        rejected += not conformant
        if done:
            exp_id = experiment.experiment_id
            found = sum(run_id(exp_id, repetition) in done for repetition in range(reps))
        else:
            found = 0
        already += found
        seconds += (reps - found) * estimated_seconds(experiment) if conformant else 0.0  # rejected: not trained
    return SweepPlan(experiments, runs, epochs, already, rejected, seconds)


# Routing: "work" is parameters x training examples x epochs of one run (the cost model of issue 6, times
# the repetitions when summed over an experiment). A run at or above GPU_MIN_WORK is heavy: it goes to a
# worker that declares a GPU resource when the cluster has one. In BUTTER's primary sweep (3000 epochs)
# the default sends the third of experiments at >= 1e13 (e.g. 2^16 parameters on connect_4) to GPUs:
# 99 % of the sweep's estimated time; the rest is step-overhead bound and runs as well on a CPU core.
GPU_MIN_WORK = 1e13
# A chunk (one Prefect task) holds minutes of work; huge sweeps get longer chunks so that one flow run
# never makes more than MAX_CHUNKS Prefect task runs (the server degrades beyond tens of thousands).
CHUNK_SECONDS = (5.0, 1800.0)
# Eight chunks per worker: the last chunks of a sweep leave workers idle while the others finish, for about
# half a chunk each; at eight per worker that tail is a few per cent of the sweep.
CHUNKS_PER_WORKER = 8
MAX_CHUNKS = 5000
MAX_RUNS_PER_STREAMED_CHUNK = 4096


def work_of(experiment: Experiment) -> float:
    """Parameters x training examples x epochs of one run (parameters taken as the target size)."""
    rows = task_rows(experiment.dataset)
    train_rows = rows - math.ceil(experiment.test_split * rows)
    return float(experiment.size) * train_rows * experiment.epochs


@dataclass(frozen=True)
class Chunk:
    """A Prefect task's worth of runs: whole stacked-model groups of one device class."""

    runs: list[Run]
    seconds: float  # estimated single-core seconds
    gpu: bool  # heavy: send to a GPU worker when the cluster has one


def chunk_seconds(todo_seconds: float, workers: int) -> float:
    """Target seconds per chunk: CHUNKS_PER_WORKER per worker, within CHUNK_SECONDS, at most MAX_CHUNKS."""
    low, high = CHUNK_SECONDS
    balanced = todo_seconds / (CHUNKS_PER_WORKER * max(workers, 1))
    return max(min(max(balanced, low), high), todo_seconds / MAX_CHUNKS)


def stream_chunks(
    spec: SweepSpec,
    done: set[str] | frozenset[str],
    *,
    target_seconds: float,
    gpu_min_work: float = GPU_MIN_WORK,
    max_runs: int | None = None,
) -> Iterator[Chunk]:
    """The runs of ``spec`` not in ``done``, in grid order, cut into chunks of about ``target_seconds``.

    Lazy: memory holds one pending chunk per device class, never the sweep, so that planning BUTTER's
    primary sweep (850k runs) stays small. Rejected experiments still pass through: their runs are
    recorded as ``rejected`` by the worker, at no cost.
    """
    pending: dict[bool, list[Run]] = {False: [], True: []}
    seconds = {False: 0.0, True: 0.0}
    emitted = 0

    def flush(heavy: bool) -> Iterator[Chunk]:
        runs, cost = pending[heavy], seconds[heavy]
        pending[heavy], seconds[heavy] = [], 0.0
        if runs:
            yield Chunk([run for group in group_runs(runs) for run in group], cost, heavy)

    for experiment in expand(spec):
        exp_id = experiment.experiment_id
        conformant = _conformant(experiment.dataset, experiment.shape, experiment.size, experiment.depth)
        per_run = estimated_seconds(experiment) if conformant else 0.0
        heavy = conformant and work_of(experiment) >= gpu_min_work
        for repetition in range(spec.repetitions):
            if max_runs is not None and emitted >= max_runs:
                break
            rid = run_id(exp_id, repetition)
            if rid in done:
                continue
            pending[heavy].append(Run(experiment, exp_id, repetition, rid, seed_of(rid), spec.name))
            seconds[heavy] += per_run
            emitted += 1
        if seconds[heavy] >= target_seconds or len(pending[heavy]) >= MAX_RUNS_PER_STREAMED_CHUNK:
            yield from flush(heavy)
        if max_runs is not None and emitted >= max_runs:
            break
    yield from flush(False)
    yield from flush(True)
