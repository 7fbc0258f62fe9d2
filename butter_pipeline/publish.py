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

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow
import pyarrow.compute as pc
from deltalake import DeltaTable

from butter_pipeline.errors import PublishConflict, StagingError
from butter_pipeline.failpoints import failpoint
from butter_pipeline.retry import retrying
from butter_pipeline.schemas import ADDED_COLUMN_DEFAULTS, EPOCHS_SCHEMA, RUNS_SCHEMA
from butter_pipeline.stage import (
    StagedFileDamaged,
    quarantine_staged,
    read_staged,
    remove_staged,
    staged_epoch_rows,
    staged_units,
)
from butter_pipeline.store import Store, create_exclusive
from butter_pipeline.tables import PUBLISHER_APP_ID, append, arrow_dataset, open_or_create, open_table
from butter_pipeline.validate import find_problems, report_json

APP_ID = PUBLISHER_APP_ID
TABLES = ("epochs", "runs")  # commit order: a run is visible only once its epochs are
PENDING = ("_publish", "pending.json")
LOCK = ("_publish", "lock.json")
STALE_LOCK_SECONDS = 600  # a lease not renewed for this long belonged to a publisher that died
LOCK_RENEW_SECONDS = 60
# A commit holds at most this many staged units and epoch rows (about 0.7 GB in memory): publishing 10,000
# staged runs of a few hundred epochs is one commit per table.
MAX_UNITS_PER_COMMIT = 4096
MAX_EPOCH_ROWS_PER_COMMIT = 4_000_000


@dataclass(frozen=True)
class PublishReport:
    units: int  # staged units published (or found already published)
    runs_added: int
    epochs_added: int
    runs_version: int | None  # the runs table's version after publishing
    commits: int
    quarantined: tuple[str, ...] = ()  # staged units set aside in quarantine/ (damaged, off the contract)


def published_run_ids(store: Store, datasets: Iterable[str] | None = None) -> pyarrow.Array:
    """Run ids in the published ``runs`` table, of ``datasets`` only when given (partition pruning)."""
    table = open_table(store, "runs")
    if table is None:
        return pyarrow.array([], pyarrow.string())
    wanted = None if datasets is None else sorted(set(datasets))
    if wanted == []:
        return pyarrow.array([], pyarrow.string())
    files = None if wanted is None else [("dataset", "in", wanted)]
    column = (
        arrow_dataset(store, table, "runs", file_pruning_predicate=files).to_table(columns=["run_id"]).column("run_id")
    )
    return column.combine_chunks() if column.num_chunks else pyarrow.array([], pyarrow.string())


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


def upgrade(table: pyarrow.Table, schema: pyarrow.Schema, what: str) -> pyarrow.Table:
    """``table`` in ``schema``: columns added by a later minor contract version are filled in.

    Work staged by an older worker (a sweep that outlives an upgrade) lacks them: nullable ones become
    null, the others take their documented default. Anything else that does not fit is refused by name.
    """
    columns = []
    for field in schema:
        if field.name in table.column_names:
            try:
                columns.append(table[field.name].cast(field.type))
            except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError, pyarrow.ArrowNotImplementedError) as exc:
                reason = str(exc).splitlines()[0]
                raise StagingError(f"{what}: column {field.name!r} is not {field.type} ({reason})") from None
        elif field.nullable:
            columns.append(pyarrow.nulls(table.num_rows, field.type))
        elif field.name in ADDED_COLUMN_DEFAULTS:
            columns.append(pyarrow.array([ADDED_COLUMN_DEFAULTS[field.name]] * table.num_rows, field.type))
        else:
            raise StagingError(f"{what}: column {field.name!r} is missing and has no default")
    unknown = sorted(set(table.column_names) - set(schema.names))
    if unknown:
        raise StagingError(f"{what}: column {unknown[0]!r} is not in the data contract")
    return pyarrow.Table.from_arrays(columns, schema=schema)


def _batch_tables(
    store: Store, units: list[str], added: set[str], quarantined: list[str]
) -> tuple[pyarrow.Table, pyarrow.Table]:
    """The rows of ``units`` whose runs are neither published nor in ``added``, each run once."""
    runs_parts, epochs_parts = [], []
    for unit in units:
        try:
            runs, epochs = read_staged(store, unit)
            runs, epochs = (
                upgrade(runs, RUNS_SCHEMA, f"staged unit {unit}"),
                upgrade(epochs, EPOCHS_SCHEMA, f"staged unit {unit}"),
            )
        except FileNotFoundError:  # quarantined by an earlier attempt at this batch, before any commit
            continue
        except StagingError as exc:  # damaged or off the contract: set aside with a report, never committed
            quarantine_staged(store, unit, str(exc))
            quarantined.append(unit)
            continue
        # checked again, as the worker did before staging: staging is a shared folder, and what reaches the
        # tables must keep the contract whoever wrote it (it halves publish throughput: docs/performance.md)
        problems = find_problems(runs, epochs)
        if problems:
            quarantine_staged(store, unit, f"staged unit {unit} breaks the data contract", report=report_json(problems))
            quarantined.append(unit)
            continue
        runs_parts.append(runs)
        epochs_parts.append(epochs)
    runs = pyarrow.concat_tables(runs_parts) if runs_parts else RUNS_SCHEMA.empty_table()
    epochs = pyarrow.concat_tables(epochs_parts) if epochs_parts else EPOCHS_SCHEMA.empty_table()
    # A run can be staged twice (a sweep planned while its first copy was being published): keep the first
    # staged copy, and nothing of a run already published.
    published = published_run_ids(store, runs.column("dataset").to_pylist())
    fresh, seen = [], set(added)
    for run_id, old in zip(
        runs.column("run_id").to_pylist(), pc.is_in(runs["run_id"], value_set=published).to_pylist(), strict=True
    ):
        fresh.append(not old and run_id not in seen)
        seen.add(run_id)
    runs = runs.filter(pyarrow.array(fresh, pyarrow.bool_()))
    keep = runs.column("run_id").combine_chunks() if runs.num_rows else pyarrow.array([], pyarrow.string())
    return runs, epochs.filter(pc.is_in(epochs["run_id"], value_set=keep))


def _complete_batch(
    store: Store, tables: dict[str, DeltaTable], record: dict, added_ids: set[str], quarantined: list[str]
) -> tuple[int, int, int]:
    """Commit batch ``record`` to every table that lacks it; returns (runs, epochs, commits) added."""
    version, units = record["version"], record["units"]
    added = (0, 0, 0)
    if _txn_version(tables["runs"]) < version:  # runs is committed last: if it has N, so has epochs
        runs, epochs = _batch_tables(store, units, added_ids, quarantined)
        commits = 0
        failpoint("publish:before-commit")
        if runs.num_rows:
            if _txn_version(tables["epochs"]) < version:
                append(tables["epochs"], epochs, "epochs", transaction=(APP_ID, version))
                commits += 1
                failpoint("publish:between-commits")
            append(tables["runs"], runs, "runs", transaction=(APP_ID, version))
            commits += 1
        added_ids.update(runs.column("run_id").to_pylist())
        added = (runs.num_rows, epochs.num_rows, commits)
    failpoint("publish:before-cleanup")
    for unit in units:
        remove_staged(store, unit)
    store.fs.rm(store.path(*PENDING))
    return added


def _holder_is_dead(held: dict) -> bool:
    """True when the lock's owner is a process of this host that no longer exists."""
    host, _, rest = str(held.get("owner", "")).partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


def _renew(store: Store, path: str, mine: dict, stop: threading.Event) -> None:
    """Keep the lease fresh while the lock is held, so that only a dead publisher's lock goes stale."""
    while not stop.wait(LOCK_RENEW_SECONDS):
        with contextlib.suppress(Exception):  # a missed renewal is retried; the lease outlasts several
            if json.loads(store.fs.cat_file(path)).get("owner") == mine["owner"]:
                store.fs.pipe_file(path, json.dumps({**mine, "renewed": time.time()}).encode())


@contextlib.contextmanager
def publisher_lock(store: Store) -> Iterator[None]:
    """Hold the store's single-writer lock, or raise ``PublishConflict`` naming who holds it.

    The lock is a lease renewed every minute: a lock not renewed for ``STALE_LOCK_SECONDS`` belonged to a
    publisher that died (killed, machine lost) and is broken; one whose owner is a dead process on this
    host is broken at once.
    """
    path = store.path(*LOCK)
    now = time.time()
    mine = {"owner": f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}", "since": now, "renewed": now}
    payload = json.dumps(mine).encode()
    if not create_exclusive(store, path, payload):
        try:
            held = json.loads(store.fs.cat_file(path))
        except (FileNotFoundError, ValueError):
            held = {"owner": "unknown", "since": 0.0}  # released meanwhile, or half-written: treat as stale
        idle = time.time() - float(held.get("renewed", held.get("since", 0.0)))
        stale = idle >= STALE_LOCK_SECONDS or _holder_is_dead(held)
        if not stale or not _break_stale(store, path, payload):
            age = time.time() - float(held.get("since", 0.0))
            raise PublishConflict(
                f"store {store.uri}: another publisher ({held.get('owner')}) has held the lock for {age:.0f} s; "
                f"wait for it, or delete {path} if that publisher is dead"
            )
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(store, path, mine, stop), daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        # released even across an outage: a lock left behind would hold off every publisher for a while
        retrying(f"store {store.uri}: releasing the publisher lock", _release, store, path, mine["owner"])


def _release(store: Store, path: str, owner: str) -> None:
    with contextlib.suppress(FileNotFoundError, ValueError):
        if json.loads(store.fs.cat_file(path)).get("owner") == owner:
            store.fs.rm(path)


def _break_stale(store: Store, path: str, payload: bytes) -> bool:
    store.fs.rm(path)
    return create_exclusive(store, path, payload)


def publish(store: Store) -> PublishReport:
    """Commit every complete staged unit into ``runs`` and ``epochs``; safe to re-run at any point.

    Only one publisher works on a store at a time (a lock object under ``_publish/``); a second one
    started meanwhile raises ``PublishConflict`` and changes nothing.
    """
    # every step is idempotent (the pending record, app transactions): after an outage, start over
    return retrying(f"store {store.uri}: publishing", _publish_once, store)


def _publish_once(store: Store) -> PublishReport:
    with publisher_lock(store):
        return _publish_locked(store)


def _batches(store: Store, units: list[str], quarantined: list[str]) -> Iterator[list[str]]:
    """``units`` cut into commits bounded by unit count and epoch rows (read from Parquet footers)."""
    batch: list[str] = []
    rows = 0
    for unit in units:
        try:
            unit_rows = staged_epoch_rows(store, unit)
        except StagedFileDamaged as exc:
            quarantine_staged(store, unit, str(exc))
            quarantined.append(unit)
            continue
        if batch and (len(batch) >= MAX_UNITS_PER_COMMIT or rows + unit_rows > MAX_EPOCH_ROWS_PER_COMMIT):
            yield batch
            batch, rows = [], 0
        batch.append(unit)
        rows += unit_rows
    if batch:
        yield batch


def _publish_locked(store: Store) -> PublishReport:
    tables = {name: open_or_create(store, name) for name in TABLES}
    published: set[str] = set()  # runs added by this publish
    runs_added = epochs_added = commits = units_done = 0
    quarantined: list[str] = []  # units set aside: damaged, or off the contract

    pending = _read_pending(store)
    if pending is not None:
        versions = {name: _txn_version(t) for name, t in tables.items()}
        if pending["version"] > max(versions.values()) + 1:
            raise PublishConflict(
                f"store {store.uri}: pending publish batch {pending['version']} is ahead of the tables "
                f"(transaction versions {versions}); the _publish record does not belong to these tables"
            )
        r, e, c = _complete_batch(store, tables, pending, published, quarantined)
        runs_added, epochs_added, commits, units_done = r, e, c, len(pending["units"])

    for batch in _batches(store, staged_units(store), quarantined):
        version = max(_txn_version(t) for t in tables.values()) + 1
        record = {"version": version, "units": batch}
        _write_pending(store, record)
        r, e, c = _complete_batch(store, tables, record, published, quarantined)
        runs_added, epochs_added, commits = runs_added + r, epochs_added + e, commits + c
        units_done += len(batch)

    runs_table = open_table(store, "runs")
    return PublishReport(
        units=units_done - len(quarantined),
        runs_added=runs_added,
        epochs_added=epochs_added,
        runs_version=None if runs_table is None else runs_table.version(),
        commits=commits,
        quarantined=tuple(quarantined),
    )
