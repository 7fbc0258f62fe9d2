"""Read a butter dataset: runs, epochs or summaries of a store, a release or any version.

Needs only pyarrow, deltalake and (for S3) the S3 credentials in the environment; it imports no torch and
no Prefect. Column selection and filters are pushed down: the ``dataset`` partition and the file and
row-group statistics of the sorted columns (shape, depth, size) skip what a question does not need.

    from butter_pipeline.read import open_dataset

    data = open_dataset("s3://bucket/butter", release="2026-12")
    curves = data.epochs(columns=["run_id", "epoch", "test_loss"],
                         where={"dataset": "mnist", "shape": "rectangle", "depth": 3}, to="polars")

``where`` maps a column to a value (equality) or to a list of values (membership); a
``pyarrow.compute.Expression`` is accepted for anything else. On ``epochs``, a condition on a run
attribute that epochs do not repeat (``learning_rate``, ``batch_size``, ...) is resolved through ``runs``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import pyarrow
import pyarrow.compute as pc
import pyarrow.dataset as ds
from deltalake import DeltaTable

from butter_pipeline.errors import ReadError
from butter_pipeline.release import load_release
from butter_pipeline.store import DEFAULT_STORE, Store, open_store
from butter_pipeline.tables import TABLE_SCHEMAS, open_table

Output = Literal["arrow", "pandas", "polars", "duckdb"]
Where = dict[str, Any] | pc.Expression | None


@dataclass
class ButterDataset:
    """The tables of one store at one moment: the latest, a release, or a ``runs`` version."""

    store: Store
    versions: dict[str, int | None]  # table -> version opened (None: the table does not exist)
    release: dict | None = None
    _tables: dict[str, DeltaTable] = field(default_factory=dict, repr=False)

    def table(self, name: str) -> DeltaTable:
        """The Delta table ``name`` at this dataset's version."""
        if name not in TABLE_SCHEMAS:
            raise ReadError(f"no table {name!r}; the tables are {', '.join(TABLE_SCHEMAS)}")
        if name not in self._tables:
            version = self.versions.get(name)
            table = None if version is None else open_table(self.store, name, version=version)
            if table is None:
                raise ReadError(f"store {self.store.uri} has no {name!r} table at this version")
            self._tables[name] = table
        return self._tables[name]

    def arrow_dataset(self, name: str, filesystem: Any = None) -> ds.Dataset:
        """A lazy ``pyarrow.dataset.Dataset`` over table ``name`` (file statistics attached for pruning)."""
        return self.table(name).to_pyarrow_dataset(filesystem=filesystem)

    def runs(self, columns: list[str] | None = None, where: Where = None, to: Output = "arrow") -> Any:
        return self._read("runs", columns, where, to)

    def epochs(self, columns: list[str] | None = None, where: Where = None, to: Output = "arrow") -> Any:
        return self._read("epochs", columns, where, to)

    def summaries(self, columns: list[str] | None = None, where: Where = None, to: Output = "arrow") -> Any:
        return self._read("summaries", columns, where, to)

    def experiment_curves(self, experiment_id: str, columns: list[str] | None = None, to: Output = "arrow") -> Any:
        """Every epoch row of one experiment's runs, found through ``runs`` so that only its slice is read."""
        keys = self.runs(columns=["dataset", "shape", "depth", "size"], where={"experiment_id": experiment_id})
        if keys.num_rows == 0:
            raise ReadError(f"experiment {experiment_id!r} is not in {self.store.uri} at this version")
        where = {name: keys[name][0].as_py() for name in keys.column_names} | {"experiment_id": experiment_id}
        return self.epochs(columns=columns, where=where, to=to)

    def _read(self, name: str, columns: list[str] | None, where: Where, to: Output) -> Any:
        dataset = self.arrow_dataset(name)
        if columns is not None:
            unknown = [c for c in columns if c not in dataset.schema.names]
            if unknown:
                known = ", ".join(dataset.schema.names)
                raise ReadError(f"{name} has no column {unknown[0]!r}; its columns are {known}")
        expression = self._expression(name, dataset.schema, where)
        if to == "duckdb":
            import duckdb

            relation = duckdb.from_arrow(dataset if expression is None else dataset.filter(expression))
            return relation if columns is None else relation.project(", ".join(f'"{c}"' for c in columns))
        table = dataset.to_table(columns=columns, filter=expression)
        if to == "arrow":
            return table
        if to == "pandas":
            return table.to_pandas()
        if to == "polars":
            import polars

            return polars.from_arrow(table)
        raise ReadError(f"to={to!r}: choose arrow, pandas, polars or duckdb")

    def _expression(self, name: str, schema: pyarrow.Schema, where: Where) -> pc.Expression | None:
        if where is None or isinstance(where, pc.Expression):
            return where
        own = {k: v for k, v in where.items() if k in schema.names}
        other = {k: v for k, v in where.items() if k not in schema.names}
        runs_schema = TABLE_SCHEMAS["runs"]
        for key in other:
            if name == "runs" or key not in runs_schema.names:
                raise ReadError(f"where: {name} has no column {key!r}; its columns are {', '.join(schema.names)}")
        expression = _conditions(own)
        if other:  # run attributes that this table does not repeat: select the runs first
            matching = self.runs(columns=["run_id"], where={k: v for k, v in where.items() if k in runs_schema.names})
            by_run = pc.field("run_id").isin(matching["run_id"].combine_chunks())
            expression = by_run if expression is None else expression & by_run
        return expression


def _conditions(where: dict[str, Any]) -> pc.Expression | None:
    expression = None
    for key, value in where.items():
        if isinstance(value, list | tuple | set | frozenset):
            term = pc.field(key).isin(list(value))
        else:
            term = pc.field(key) == value
        expression = term if expression is None else expression & term
    return expression


def _as_of(store: Store, name: str, moment: datetime) -> int | None:
    """The version of table ``name`` current at ``moment`` (its latest commit at or before it)."""
    table = open_table(store, name)
    if table is None:
        return None
    try:
        table.load_as_version(moment)
    except Exception:  # created after ``moment``: it did not exist then
        return None
    return table.version()


def open_dataset(
    store: str | os.PathLike[str] = DEFAULT_STORE, *, release: str | None = None, version: int | None = None
) -> ButterDataset:
    """Open ``store`` as it is now, as release ``release``, or as of ``runs`` table version ``version``.

    A version number names a state of ``runs``; ``epochs`` and ``summaries`` are opened as they were when
    that version was committed (the publisher commits a batch's epochs before its runs).
    """
    if release is not None and version is not None:
        raise ReadError("give a release or a version, not both")
    opened = open_store(store, create=False)
    if not opened.is_local and not opened.fs.exists(opened.root):
        raise ReadError(f"store {opened.uri} does not exist")
    if opened.is_local and not os.path.isdir(opened.root):
        raise ReadError(f"store {opened.uri} does not exist")
    if release is not None:
        manifest = load_release(opened, release)
        return ButterDataset(opened, dict(manifest["versions"]), release=manifest)
    if version is None:
        versions = {name: _latest(opened, name) for name in TABLE_SCHEMAS}
        return ButterDataset(opened, versions)
    runs = open_table(opened, "runs")
    if runs is None or not 0 <= version <= runs.version():
        latest = "none" if runs is None else str(runs.version())
        raise ReadError(f"store {opened.uri}: runs has no version {version} (latest: {latest})")
    committed = _commit_time(opened, "runs", version)
    versions = {"runs": version} | {name: _as_of(opened, name, committed) for name in ("epochs", "summaries")}
    return ButterDataset(opened, versions)


def _commit_time(store: Store, name: str, version: int) -> datetime:
    """When ``version`` of table ``name`` was committed, from its log entry (``history()`` of delta-rs
    1.6 mislabels versions on a table opened at an older version)."""
    entry = store.fs.cat_file(store.path(name, "_delta_log", f"{version:020d}.json")).decode()
    for line in entry.splitlines():
        action = json.loads(line)
        if "commitInfo" in action:
            return datetime.fromtimestamp(action["commitInfo"]["timestamp"] / 1000, UTC)
    raise ReadError(f"{name} version {version} has no commit time in its log")


def _latest(store: Store, name: str) -> int | None:
    table = open_table(store, name)
    return None if table is None else table.version()
