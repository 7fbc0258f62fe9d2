"""The publisher: commits staged units into the Delta tables ``runs`` and ``epochs``, exactly once.

Only the publisher writes the Delta tables. A publish proceeds in numbered batches; batch N is written
to ``_publish/pending.json`` (the units it covers) before anything is committed, then committed to
``epochs`` and then ``runs``, each commit carrying the Delta app transaction (``butter-publisher``, N) in
the table's log. If the publisher dies part-way, the next publish finds the pending record, sees from
each table's transaction version which commits already happened, and completes only the missing ones.
Rows whose run is already in ``runs`` are dropped before a batch is formed, so publishing twice, or
staging a run twice, adds nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import TableNotFoundError

from butter_pipeline.errors import PublishConflict
from butter_pipeline.schemas import EPOCHS_SCHEMA, PARTITION_COLUMNS, RUNS_SCHEMA
from butter_pipeline.stage import read_staged, remove_staged, staged_units
from butter_pipeline.store import Store

APP_ID = "butter-publisher"
TABLES = {"runs": RUNS_SCHEMA, "epochs": EPOCHS_SCHEMA}
PENDING = ("_publish", "pending.json")
MAX_UNITS_PER_COMMIT = 2048  # bounds the publisher's memory; 10,000 staged runs are a handful of commits


@dataclass(frozen=True)
class PublishReport:
    units: int  # staged units consumed
    runs_added: int
    epochs_added: int
    runs_version: int | None  # the runs table's version after publishing
    commits: int


def open_table(store: Store, name: str) -> DeltaTable | None:
    try:
        return DeltaTable(store.table_uri(name), storage_options=store.storage_options or None)
    except TableNotFoundError:
        return None


def _open_or_create(store: Store, name: str) -> DeltaTable:
    table = open_table(store, name)
    if table is None:
        table = DeltaTable.create(
            store.table_uri(name),
            schema=TABLES[name],
            partition_by=list(PARTITION_COLUMNS),
            name=name,
            storage_options=store.storage_options or None,
        )
    return table


def published_run_ids(store: Store) -> set[str]:
    """Run ids in the published ``runs`` table (empty when it does not exist yet)."""
    table = open_table(store, "runs")
    if table is None:
        return set()
    return set(table.to_pyarrow_dataset().to_table(columns=["run_id"]).column("run_id").to_pylist())


def _txn_version(table: DeltaTable) -> int:
    return table.transaction_version(APP_ID) or 0


def _read_pending(store: Store) -> dict | None:
    path = store.path(*PENDING)
    if not store.fs.exists(path):
        return None
    return json.loads(store.fs.cat_file(path))


def _write_pending(store: Store, record: dict) -> None:
    path = store.path(*PENDING)
    store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    store.fs.pipe_file(path, json.dumps(record).encode())


def _batch_tables(store: Store, units: list[str], exclude: set[str]) -> tuple[pyarrow.Table, pyarrow.Table]:
    """The rows of ``units`` whose runs are not in ``exclude``, each run once."""
    runs_parts, epochs_parts, seen = [], [], set(exclude)
    for unit in units:
        runs, epochs = read_staged(store, unit)
        fresh = [r for r in runs.column("run_id").to_pylist() if r not in seen]
        seen.update(fresh)
        mask = pyarrow.array(fresh, pyarrow.string())
        runs_parts.append(runs.filter(pc.is_in(runs["run_id"], value_set=mask)))
        epochs_parts.append(epochs.filter(pc.is_in(epochs["run_id"], value_set=mask)))
    runs = pyarrow.concat_tables(runs_parts) if runs_parts else RUNS_SCHEMA.empty_table()
    epochs = pyarrow.concat_tables(epochs_parts) if epochs_parts else EPOCHS_SCHEMA.empty_table()
    return runs.cast(RUNS_SCHEMA), epochs.cast(EPOCHS_SCHEMA)


def _commit(table: DeltaTable, data: pyarrow.Table, version: int) -> None:
    write_deltalake(
        table,
        data,
        mode="append",
        partition_by=list(PARTITION_COLUMNS),
        commit_properties=CommitProperties(app_transactions=[Transaction(app_id=APP_ID, version=version)]),
    )


def _complete_batch(
    store: Store, tables: dict[str, DeltaTable], record: dict, published: set[str]
) -> tuple[int, int, int]:
    """Commit batch ``record`` to every table that lacks it; returns (runs, epochs, commits) added."""
    version, units = record["version"], record["units"]
    added = (0, 0, 0)
    if _txn_version(tables["runs"]) < version:  # runs is committed last: if it has N, so has epochs
        runs, epochs = _batch_tables(store, units, published)
        commits = 0
        if runs.num_rows:
            if _txn_version(tables["epochs"]) < version:
                _commit(tables["epochs"], epochs, version)
                commits += 1
            _commit(tables["runs"], runs, version)
            commits += 1
        published.update(runs.column("run_id").to_pylist())
        added = (runs.num_rows, epochs.num_rows, commits)
    for unit in units:
        remove_staged(store, unit)
    store.fs.rm(store.path(*PENDING))
    return added


def publish(store: Store) -> PublishReport:
    """Commit every complete staged unit into ``runs`` and ``epochs``; safe to re-run at any point."""
    tables = {name: _open_or_create(store, name) for name in TABLES}
    published = published_run_ids(store)
    runs_added = epochs_added = commits = units_done = 0

    pending = _read_pending(store)
    if pending is not None:
        versions = {name: _txn_version(t) for name, t in tables.items()}
        if pending["version"] > max(versions.values()) + 1:
            raise PublishConflict(
                f"store {store.uri}: pending publish batch {pending['version']} is ahead of the tables "
                f"(transaction versions {versions}); the _publish record does not belong to these tables"
            )
        r, e, c = _complete_batch(store, tables, pending, published)
        runs_added, epochs_added, commits, units_done = r, e, c, len(pending["units"])

    units = staged_units(store)
    for start in range(0, len(units), MAX_UNITS_PER_COMMIT):
        batch = units[start : start + MAX_UNITS_PER_COMMIT]
        version = max(_txn_version(t) for t in tables.values()) + 1
        record = {"version": version, "units": batch}
        _write_pending(store, record)
        r, e, c = _complete_batch(store, tables, record, published)
        runs_added, epochs_added, commits = runs_added + r, epochs_added + e, commits + c
        units_done += len(batch)

    runs_table = open_table(store, "runs")
    return PublishReport(
        units=units_done,
        runs_added=runs_added,
        epochs_added=epochs_added,
        runs_version=None if runs_table is None else runs_table.version(),
        commits=commits,
    )
