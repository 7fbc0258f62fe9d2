"""The sweep flow: plan -> train chunks on Dask -> publish -> summarize.

Each Prefect task carries a chunk of runs (never one task per run); the chunk runs on a Dask worker,
which trains, validates and stages every run in it. The publisher then runs once, in the flow's process.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect_dask import DaskTaskRunner

from butter_pipeline import execute
from butter_pipeline import plan as planning
from butter_pipeline import publish as publishing
from butter_pipeline import summarize as summarizing
from butter_pipeline.store import DEFAULT_STORE, open_store
from butter_pipeline.sweep import Run, load_spec


def local_cluster_runner(workers: int | None = None) -> DaskTaskRunner:
    """A Dask LocalCluster of single-threaded worker processes on loopback, one per core by default."""
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": workers or os.cpu_count() or 1,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": None,
        },
    )


@task(name="train-chunk", cache_policy=NO_CACHE)
def train_chunk(store: str, runs: list[Run]) -> dict[str, int]:
    return execute.run_chunk(store, runs)


@task(name="publish", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def publish_staged(store: str) -> dict[str, int | None]:
    return asdict(publishing.publish(open_store(store)))


@task(name="summarize", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def summarize_published(store: str) -> dict[str, int | None]:
    target = open_store(store)
    with publishing.publisher_lock(target):
        return asdict(summarizing.update_summaries(target))


@flow(name="butter-sweep", task_runner=local_cluster_runner())
def sweep_flow(
    sweep: str = "smoke",
    store: str = DEFAULT_STORE,
    max_runs: int | None = None,
    workers: int | None = None,
) -> dict[str, object]:
    """Train the runs of ``sweep`` that ``store`` does not hold yet, then publish them."""
    logger = get_run_logger()
    spec = load_spec(sweep)
    target = open_store(store)

    # Plan: what the store already holds is done; the rest is cut into chunks of work
    plan = planning.make_plan(spec, planning.done_run_ids(target), max_runs=max_runs)
    chunks = planning.chunk_runs(plan.todo, workers=workers or os.cpu_count() or 1)
    logger.info(
        "%s: %d runs, %d done, %d to train in %d chunks", spec.name, plan.runs, plan.done, len(plan.todo), len(chunks)
    )

    # Train: one Prefect task per chunk, fanned out over Dask
    futures = [train_chunk.submit(target.uri, chunk) for chunk in chunks]
    wait(futures)
    outcomes: Counter[str] = Counter()
    failures = []
    for future in futures:
        if future.state.is_completed():
            outcomes.update(future.result())
        else:
            failures.append(future.state)

    # Publish whatever was staged, even when some chunks failed, so no finished work waits
    report = publish_staged(target.uri)
    summary = summarize_published(target.uri)
    if failures:
        failures[0].result()  # re-raises the first chunk's error after the staged work is safe
    return {
        "sweep": spec.name,
        "store": target.uri,
        "planned": len(plan.todo),
        "already_done": plan.done,
        "outcomes": dict(outcomes),
        "publish": report,
        "summarize": summary,
    }
