"""The sweep flow: plan -> train chunks on Dask -> publish -> summarize, with progress artifacts.

``sweep_flow`` is what a deployment (or ``butter run``) starts. It picks the Dask cluster (a LocalCluster,
or the scheduler at ``dask_address``), looks at which workers declare a ``GPU`` resource, and runs the
training as a subflow on that cluster: one Prefect task per chunk of minutes of work (never one per run),
heavy chunks pinned to GPU workers by ``dask.annotate``, at most a few chunks per worker in flight so that
memory stays bounded however large the sweep. The publisher then runs once, in the flow's own process.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from dataclasses import asdict

import dask
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect_dask import DaskTaskRunner

from butter_pipeline import execute
from butter_pipeline import plan as planning
from butter_pipeline import progress as progressing
from butter_pipeline import publish as publishing
from butter_pipeline import summarize as summarizing
from butter_pipeline.orchestrate import ClusterWorkers, cluster_workers
from butter_pipeline.store import DEFAULT_STORE, open_store
from butter_pipeline.sweep import Run, load_spec

CHUNKS_IN_FLIGHT_PER_WORKER = 2  # enough to keep a worker busy while the next chunk is serialized
MARKDOWN_EVERY_SECONDS = 60.0


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


# A chunk that raises (not a run: runs that raise are retried inside, then recorded as failed) is tried
# once more; a worker that dies is Dask's to handle: it re-runs the chunk elsewhere, and runs already
# staged by the dead worker are found staged and not trained again.
@task(name="train-chunk", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def train_chunk(store: str, runs: list[Run]) -> dict[str, int]:
    return execute.run_chunk(store, runs)


@task(name="publish", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def publish_staged(store: str) -> dict[str, int | None]:
    return asdict(publishing.publish(open_store(store)))


@task(name="summarize", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def summarize_published(store: str) -> dict[str, int | None]:
    return asdict(summarizing.summarize_store(open_store(store)))


def _placement(chunk: planning.Chunk, workers: ClusterWorkers) -> contextlib.AbstractContextManager:
    """Heavy chunks need a GPU worker; light ones prefer CPU workers, so GPUs stay free for heavy work."""
    if not workers.gpu:
        return contextlib.nullcontext()  # no GPU declared: annotating would leave heavy work pending forever
    if chunk.gpu:
        return dask.annotate(resources={"GPU": 1})
    if workers.cpu:
        return dask.annotate(workers=list(workers.cpu), allow_other_workers=True)
    return contextlib.nullcontext()


def _artifact_key(sweep: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in sweep.lower()).strip("-") or "sweep"
    return f"butter-sweep-{slug}"[:64]


class _Reporter:
    """Keeps the flow run's progress artifact and the sweep's markdown table up to date."""

    def __init__(self, sweep: str, store: str, planned: int, to_train: int) -> None:
        self.sweep, self.store, self.planned, self.to_train = sweep, store, planned, to_train
        self.trained = 0
        self.started = time.monotonic()
        self.last_markdown = 0.0
        self.artifact = create_progress_artifact(
            progress=0.0, key=_artifact_key(sweep), description=f"{sweep}: share of this flow run's runs trained"
        )
        self.markdown()

    def chunk_done(self, runs: int) -> None:
        self.trained += runs
        share = 100.0 * self.trained / self.to_train if self.to_train else 100.0
        update_progress_artifact(self.artifact, progress=min(share, 100.0))
        if time.monotonic() - self.last_markdown >= MARKDOWN_EVERY_SECONDS:
            self.markdown()

    def markdown(self) -> None:
        self.last_markdown = time.monotonic()
        try:
            rows = progressing.sweep_progress(open_store(self.store), {self.sweep: self.planned})
        except Exception as exc:  # progress is best effort: a store outage must not stop the sweep
            get_run_logger().warning("progress not updated: %s", str(exc).splitlines()[0] if str(exc) else exc)
            return
        elapsed = time.monotonic() - self.started
        pace = f"{self.trained / elapsed * 3600:,.0f} runs/hour" if self.trained and elapsed > 0 else "-"
        body = progressing.as_markdown([p for p in rows if p.sweep == self.sweep], self.store)
        body += f"\nThis flow run: {self.trained:,} of {self.to_train:,} runs trained, {pace}.\n"
        create_markdown_artifact(markdown=body, key=_artifact_key(self.sweep), description=f"{self.sweep} progress")


@flow(name="butter-train", task_runner=local_cluster_runner())
def train_flow(
    sweep: str,
    store: str,
    max_runs: int | None = None,
    workers: int | None = None,
    gpu_workers: list[str] | None = None,
    cpu_workers: list[str] | None = None,
    gpu_min_work: float = planning.GPU_MIN_WORK,
) -> dict[str, object]:
    """Train the runs of ``sweep`` that ``store`` lacks, chunk by chunk, on this flow's Dask cluster."""
    logger = get_run_logger()
    spec = load_spec(sweep)
    target = open_store(store)
    cluster = ClusterWorkers(gpu=tuple(gpu_workers or ()), cpu=tuple(cpu_workers or ()))
    parallel = max(len(cluster.gpu) + len(cluster.cpu), workers or os.cpu_count() or 1)

    # Plan: what the store holds is done; count the rest, then stream it out in chunks
    done = planning.done_run_ids(target)
    counts = planning.make_plan(spec, done)
    to_train = counts.todo_runs if max_runs is None else min(counts.todo_runs, max_runs)
    seconds = counts.todo_seconds * (to_train / counts.todo_runs if counts.todo_runs else 0.0)
    target_seconds = planning.chunk_seconds(seconds, parallel)
    logger.info(
        "%s: %d runs, %d done, %d to train (about %.0f core-seconds, chunks of about %.0f s; GPU workers: %d)",
        spec.name, counts.runs, counts.done, to_train, seconds, target_seconds, len(cluster.gpu),
    )  # fmt: skip
    reporter = _Reporter(spec.name, target.uri, counts.runs, to_train)

    # Train: a bounded number of chunks in flight; each finished chunk makes room for the next
    outcomes: Counter[str] = Counter()
    failures = []
    limit = CHUNKS_IN_FLIGHT_PER_WORKER * parallel
    in_flight: dict[PrefectFuture, int] = {}

    def collect(future: PrefectFuture) -> None:
        runs = in_flight.pop(future)
        try:
            outcomes.update(future.result())
        except Exception as exc:  # the chunk failed after its retries: keep going, report it at the end
            failures.append(exc)
        reporter.chunk_done(runs)

    chunks = planning.stream_chunks(spec, done, target_seconds=target_seconds, gpu_min_work=gpu_min_work,
                                    max_runs=max_runs)  # fmt: skip
    for chunk in chunks:
        while len(in_flight) >= limit:
            collect(next(as_completed(list(in_flight))))
        with _placement(chunk, cluster):
            in_flight[train_chunk.submit(target.uri, chunk.runs)] = len(chunk.runs)
        outcomes["chunks"] += 1
        outcomes["gpu-chunks"] += chunk.gpu and bool(cluster.gpu)
    for future in as_completed(list(in_flight)):
        collect(future)
    reporter.markdown()
    if failures:
        logger.error("%d chunks failed after retries; their runs stay untrained until the next run", len(failures))
    return {
        "planned": to_train,
        "already_done": counts.done,
        "outcomes": dict(outcomes),
        "first_failure": failures[0] if failures else None,  # the caller raises it after publishing
    }


@flow(name="butter-sweep")
def sweep_flow(
    sweep: str = "smoke",
    store: str = DEFAULT_STORE,
    max_runs: int | None = None,
    dask_address: str | None = None,
    workers: int | None = None,
    gpu_min_work: float = planning.GPU_MIN_WORK,
) -> dict[str, object]:
    """Train the runs of a sweep that the store lacks, publish them and update the summaries.

    Args:
        sweep: A preset name (smoke, validation, primary, ...) or the path of a sweep .toml file.
        store: Where the dataset lives: a folder or s3://bucket/prefix.
        max_runs: Train at most this many new runs in this flow run (empty: all that are missing).
        dask_address: A Dask scheduler (tcp://host:8786) to train on; empty: a local cluster.
        workers: Local cluster size when no scheduler is given (empty: one worker per core).
        gpu_min_work: Runs with at least this many parameters x examples x epochs go to GPU workers.
    """
    target = open_store(store)
    if dask_address:
        cluster = cluster_workers(dask_address)
        runner = DaskTaskRunner(address=dask_address)
    else:
        cluster = ClusterWorkers()
        runner = local_cluster_runner(workers)
    trained = train_flow.with_options(task_runner=runner)(
        sweep=sweep,
        store=target.uri,
        max_runs=max_runs,
        workers=workers,
        gpu_workers=list(cluster.gpu),
        cpu_workers=list(cluster.cpu),
        gpu_min_work=gpu_min_work,
    )

    # Publish whatever was staged, even when some chunks failed, so that no finished work waits
    report = publish_staged(target.uri)
    summary = summarize_published(target.uri)
    if trained["first_failure"] is not None:
        raise trained["first_failure"]  # the chunk's own error, now that its staged work is safe
    return {
        "sweep": load_spec(sweep).name,
        "store": target.uri,
        "planned": trained["planned"],
        "already_done": trained["already_done"],
        "outcomes": trained["outcomes"],
        "publish": report,
        "summarize": summary,
    }
