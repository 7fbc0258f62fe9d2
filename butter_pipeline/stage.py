"""Staging: a worker writes each validated result once, as immutable Parquet, for the publisher to commit.

A staged unit is a folder ``staging/<unit_id>/`` holding ``epochs.parquet`` and then ``runs.parquet``;
``runs.parquet`` is written last, so a unit without it is incomplete and ignored. On a local store each
file is written under a temporary name and renamed into place; on S3 a PUT is atomic. Units are named by
id, so a re-executed task (Dask re-runs tasks of a dead worker) finds its unit staged and writes nothing.
A result that breaks the contract goes to ``quarantine/<unit_id>/`` with ``report.json`` instead.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import pyarrow
import pyarrow.compute
import pyarrow.parquet as pq

from butter_pipeline.errors import StagingError
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


class StagedFileDamaged(StagingError):
    """Raised when a staged file's bytes are not a readable Parquet file (truncated, corrupted)."""


def read_staged_file(store: Store, folder: str, unit_id: str, name: str, columns: list[str] | None = None):
    """One staged Parquet file as a table. The bytes are fetched first, so that an unreachable store
    raises the store's own error, and only bytes that do not parse raise ``StagedFileDamaged``."""
    path = store.path(folder, unit_id, name)
    payload = store.fs.cat_file(path)
    try:
        return pq.read_table(io.BytesIO(payload), columns=columns)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError or ValueError for damaged bytes
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StagedFileDamaged(f"{path}: not a readable Parquet file ({reason})") from None


def staged_run_count(store: Store, folder: str, unit_id: str) -> int:
    """Runs in a staged or quarantined unit (0 for a unit whose runs file is damaged)."""
    try:
        return read_staged_file(store, folder, unit_id, RUNS_FILE, columns=["run_id"]).num_rows
    except StagedFileDamaged:
        return 0


def staged_epoch_rows(store: Store, unit_id: str) -> int:
    """Epoch rows of a staged unit, from the ``epochs_recorded`` of its runs (the small file)."""
    runs = read_staged_file(store, STAGING, unit_id, RUNS_FILE, columns=["epochs_recorded"])
    return int(pyarrow.compute.sum(runs["epochs_recorded"]).as_py() or 0)


def staged_run_ids(store: Store, unit_id: str) -> list[str]:
    """Run ids of a staged unit, from the ``run_id`` column of its ``runs.parquet``."""
    return read_staged_file(store, STAGING, unit_id, RUNS_FILE, columns=["run_id"]).column("run_id").to_pylist()


def read_staged(store: Store, unit_id: str) -> tuple[pyarrow.Table, pyarrow.Table]:
    """(runs, epochs) of a staged unit."""
    return read_staged_file(store, STAGING, unit_id, RUNS_FILE), read_staged_file(store, STAGING, unit_id, EPOCHS_FILE)


def quarantine_staged(store: Store, unit_id: str, reason: str, *, report: str | None = None) -> None:
    """Move a staged unit that cannot be published (unreadable, truncated, off the contract) to
    ``quarantine/<unit_id>/`` with a report saying why; its runs are then no longer done, so a resumed
    sweep trains them again. Safe to call twice, or on a unit half moved by a process that died."""
    for name in (EPOCHS_FILE, RUNS_FILE):
        source = store.path(STAGING, unit_id, name)
        try:
            if store.fs.exists(source):
                write_atomically(store, store.path(QUARANTINE, unit_id, name), store.fs.cat_file(source))
        except OSError:  # bytes that cannot even be copied: the report is what is left
            pass
    if report is None:  # ``report``: the validator's JSON report; else the one reason given
        report = json.dumps([{"table": None, "column": None, "check": "staged_unit_publishable", "detail": reason}])
    write_atomically(store, store.path(QUARANTINE, unit_id, REPORT_FILE), report.encode())
    remove_staged(store, unit_id)


def remove_staged(store: Store, unit_id: str) -> None:
    """Delete a published unit: ``runs.parquet`` first, so a half-removed unit is never seen as complete."""
    for name in (RUNS_FILE, EPOCHS_FILE):
        path = store.path(STAGING, unit_id, name)
        if store.fs.exists(path):
            store.fs.rm(path)
    folder = store.path(STAGING, unit_id)
    if store.is_local and store.fs.exists(folder):
        store.fs.rm(folder, recursive=True)
