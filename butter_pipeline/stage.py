"""Staging: a worker writes each validated result once, as immutable Parquet, for the publisher to commit.

A staged unit is a folder ``staging/<unit_id>/`` holding ``epochs.parquet`` and then ``runs.parquet``;
``runs.parquet`` is written last, so a unit without it is incomplete and ignored. On a local store each
file is written under a temporary name and renamed into place; on S3 a PUT is atomic. Units are named by
id, so a re-executed task (Dask re-runs tasks of a dead worker) finds its unit staged and writes nothing.
A result that breaks the contract goes to ``quarantine/<unit_id>/`` with ``report.json`` instead.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import pyarrow
import pyarrow.parquet as pq

from butter_pipeline.store import Store, write_atomically
from butter_pipeline.validate import find_problems, report_json

STAGING, QUARANTINE = "staging", "quarantine"
RUNS_FILE, EPOCHS_FILE, REPORT_FILE = "runs.parquet", "epochs.parquet", "report.json"


@dataclass(frozen=True)
class StageOutcome:
    unit_id: str
    status: str  # "staged", "already-staged" or "quarantined"
    runs: int
    problems: int = 0


def _parquet_bytes(table: pyarrow.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def is_staged(store: Store, unit_id: str) -> bool:
    return store.fs.exists(store.path(STAGING, unit_id, RUNS_FILE))


def stage_result(store: Store, unit_id: str, runs: pyarrow.Table, epochs: pyarrow.Table) -> StageOutcome:
    """Validate and stage one unit (idempotent); a unit that breaks the contract is quarantined instead."""
    if is_staged(store, unit_id):
        return StageOutcome(unit_id, "already-staged", runs.num_rows)
    problems = find_problems(runs, epochs)
    if problems:
        folder = (QUARANTINE, unit_id)
        write_atomically(store, store.path(*folder, REPORT_FILE), report_json(problems).encode())
        write_atomically(store, store.path(*folder, EPOCHS_FILE), _parquet_bytes(epochs))
        write_atomically(store, store.path(*folder, RUNS_FILE), _parquet_bytes(runs))
        return StageOutcome(unit_id, "quarantined", runs.num_rows, len(problems))
    write_atomically(store, store.path(STAGING, unit_id, EPOCHS_FILE), _parquet_bytes(epochs))
    write_atomically(store, store.path(STAGING, unit_id, RUNS_FILE), _parquet_bytes(runs))
    return StageOutcome(unit_id, "staged", runs.num_rows)


def staged_units(store: Store) -> list[str]:
    """Ids of the complete staged units (those whose ``runs.parquet`` exists), sorted."""
    pattern = store.path(STAGING, "*", RUNS_FILE)
    return sorted(path.rstrip("/").split("/")[-2] for path in store.fs.glob(pattern))


def quarantined_units(store: Store) -> list[str]:
    pattern = store.path(QUARANTINE, "*", REPORT_FILE)
    return sorted(path.rstrip("/").split("/")[-2] for path in store.fs.glob(pattern))


def units_in(store: Store) -> set[tuple[str, str]]:
    """(folder, unit id) of every complete staged or quarantined unit."""
    return {(STAGING, u) for u in staged_units(store)} | {(QUARANTINE, u) for u in quarantined_units(store)}


def staged_run_count(store: Store, folder: str, unit_id: str) -> int:
    """Runs in a staged or quarantined unit, from its Parquet footer (reads no data)."""
    with store.fs.open(store.path(folder, unit_id, RUNS_FILE), "rb") as handle:
        return pq.read_metadata(handle).num_rows


def staged_epoch_rows(store: Store, unit_id: str) -> int:
    """Epoch rows of a staged unit, from its Parquet footer."""
    with store.fs.open(store.path(STAGING, unit_id, EPOCHS_FILE), "rb") as handle:
        return pq.read_metadata(handle).num_rows


def staged_run_ids(store: Store, unit_id: str) -> list[str]:
    """Run ids of a staged unit, reading only the ``run_id`` column of its ``runs.parquet``."""
    with store.fs.open(store.path(STAGING, unit_id, RUNS_FILE), "rb") as handle:
        return pq.read_table(handle, columns=["run_id"]).column("run_id").to_pylist()


def read_staged(store: Store, unit_id: str) -> tuple[pyarrow.Table, pyarrow.Table]:
    """(runs, epochs) of a staged unit."""
    tables = []
    for name in (RUNS_FILE, EPOCHS_FILE):
        with store.fs.open(store.path(STAGING, unit_id, name), "rb") as handle:
            tables.append(pq.read_table(handle))
    return tables[0], tables[1]


def remove_staged(store: Store, unit_id: str) -> None:
    """Delete a published unit: ``runs.parquet`` first, so a half-removed unit is never seen as complete."""
    for name in (RUNS_FILE, EPOCHS_FILE):
        path = store.path(STAGING, unit_id, name)
        if store.fs.exists(path):
            store.fs.rm(path)
    folder = store.path(STAGING, unit_id)
    if store.is_local and store.fs.exists(folder):
        store.fs.rm(folder, recursive=True)
