"""Releases: named, immutable table versions with a manifest, under ``<store>/releases/<name>.json``.

A release records the version of ``runs``, ``epochs`` and ``summaries`` at one moment (taken under the
publisher lock, after bringing summaries up to date), with counts, the schema and package versions and the
sweeps covered. It is created only if the name is free (exclusive create), so it never changes. Readers
open it by name (``butter_pipeline.read.open_dataset(store, release=NAME)``); vacuum keeps its files and
the tables keep their logs, so it stays readable after any number of later commits.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pyarrow
import pyarrow.compute as pc
from deltalake import DeltaTable

from butter_pipeline.errors import ReleaseError
from butter_pipeline.schemas import SCHEMA_VERSION
from butter_pipeline.store import Store, create_exclusive
from butter_pipeline.tables import TABLE_SCHEMAS, arrow_dataset, open_table

RELEASES = "releases"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _path(store: Store, name: str) -> str:
    if not _NAME.match(name):
        raise ReleaseError(
            f"release name {name!r}: use letters, digits, '.', '_' or '-' "
            "(at most 100, starting with a letter or digit)"
        )
    return store.path(RELEASES, f"{name}.json")


def _package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("butter-pipeline")
    except metadata.PackageNotFoundError:
        return "unknown"


def _row_count(table: DeltaTable | None) -> int:
    """Rows of a table version, from the Delta log's per-file counts (reads no data)."""
    if table is None:
        return 0
    return int(pc.sum(pyarrow.table(table.get_add_actions(flatten=True))["num_records"]).as_py() or 0)


def _manifest(store: Store, name: str, description: str) -> dict:
    tables = {table: open_table(store, table) for table in TABLE_SCHEMAS}
    if tables["runs"] is None:
        raise ReleaseError(f"store {store.uri}: nothing is published yet, so there is nothing to release")
    versions = {table: (None if dt is None else dt.version()) for table, dt in tables.items()}
    rows = {table: _row_count(dt) for table, dt in tables.items()}
    runs = arrow_dataset(store, tables["runs"], "runs").to_table(
        columns=["status", "dataset", "experiment_id", "sweeps"]
    )
    statuses = runs.group_by("status").aggregate([("status", "count")]).to_pylist()
    datasets = runs.group_by("dataset").aggregate([("dataset", "count")]).to_pylist()
    sweeps = pc.unique(pc.list_flatten(runs["sweeps"])).to_pylist() if runs.num_rows else []
    return {
        "name": name,
        "description": description,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "store": store.uri,
        "versions": versions,
        "rows": rows,
        "runs_by_status": {r["status"]: r["status_count"] for r in statuses},
        "runs_by_dataset": {r["dataset"]: r["dataset_count"] for r in datasets},
        "experiments": len(pc.unique(runs["experiment_id"])),
        "sweeps": sorted(sweeps),
        "schema_version": SCHEMA_VERSION,
        "butter_version": _package_version(),
    }


def create_release(store: Store, name: str, *, description: str = "") -> dict:
    """Record release ``name`` of the store as it is now; raises ``ReleaseError`` if the name is taken."""
    from butter_pipeline.publish import publisher_lock  # writers only: readers import this module too
    from butter_pipeline.retry import retrying
    from butter_pipeline.summarize import update_summaries

    path = _path(store, name)
    taken = f"release {name!r} already exists in {store.uri}; releases never change, pick a new name"
    if store.fs.exists(path):
        raise ReleaseError(taken)

    def locked() -> dict:
        with publisher_lock(store):  # no commit lands while the versions are read
            update_summaries(store)
            manifest = _manifest(store, name, description)
            if not create_exclusive(store, path, json.dumps(manifest, indent=2).encode()):
                raise ReleaseError(taken)
        return manifest

    return retrying(f"store {store.uri}: recording release {name!r}", locked)


def load_release(store: Store, name: str) -> dict:
    path = _path(store, name)
    try:
        return json.loads(store.fs.cat_file(path))
    except FileNotFoundError:
        known = ", ".join(r["name"] for r in list_releases(store)) or "none"
        raise ReleaseError(f"release {name!r} is not in {store.uri} (releases: {known})") from None


def list_releases(store: Store) -> list[dict]:
    """Every release's manifest, oldest first."""
    folder = store.path(RELEASES)
    if not store.fs.exists(folder):
        return []
    manifests = [json.loads(store.fs.cat_file(p)) for p in store.fs.glob(f"{folder}/*.json")]
    return sorted(manifests, key=lambda m: (m["created_at"], m["name"]))


def released_versions(store: Store, table: str) -> list[int]:
    """Versions of ``table`` that some release pins (vacuum must keep their files)."""
    return sorted({m["versions"][table] for m in list_releases(store) if m["versions"].get(table) is not None})
