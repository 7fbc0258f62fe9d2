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

import os
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow
import pyarrow.compute as pc
import pyarrow.dataset as ds
from deltalake import DeltaTable

from butter_pipeline.errors import ReadError
from butter_pipeline.release import load_release
from butter_pipeline.store import DEFAULT_STORE, Store, open_store
from butter_pipeline.tables import PUBLISHER_APP_ID, SUMMARIZER_APP_ID, TABLE_SCHEMAS, arrow_dataset, open_table

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
        if filesystem is None:
            return arrow_dataset(self.store, self.table(name), name)
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


def _last_version_within(store: Store, name: str, app_id: str, limit: int) -> int | None:
    """The newest version of table ``name`` whose app transaction ``app_id`` is at most ``limit``.

    Transaction versions only grow with table versions, so a binary search over versions finds it. This
    pairs tables by what they contain (the publisher's batch number, the runs version summarized), not by
    commit timestamps, which S3 keeps to the second.
    """
    table = open_table(store, name)
    if table is None or (table.transaction_version(app_id) or 0) <= limit:
        return None if table is None else table.version()
    low, high = 0, table.version() - 1  # invariant: the answer is in [low, high]; version 0 always qualifies
    while low < high:
        middle = (low + high + 1) // 2
        if (open_table(store, name, version=middle).transaction_version(app_id) or 0) <= limit:
            low = middle
        else:
            high = middle - 1
    return low


def open_dataset(
    store: str | os.PathLike[str] = DEFAULT_STORE, *, release: str | None = None, version: int | None = None
) -> ButterDataset:
    """Open ``store`` as it is now, as release ``release``, or as of ``runs`` table version ``version``.

    A version number names a state of ``runs``; ``epochs`` is opened at its last version holding no batch
    newer than that runs version, and ``summaries`` at its last version computed from runs no newer.
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
        return ButterDataset(opened, _latest_consistent(opened))
    runs = open_table(opened, "runs")
    if runs is None or not 0 <= version <= runs.version():
        latest = "none" if runs is None else str(runs.version())
        raise ReadError(f"store {opened.uri}: runs has no version {version} (latest: {latest})")
    batch = open_table(opened, "runs", version=version).transaction_version(PUBLISHER_APP_ID) or 0
    versions = {
        "runs": version,
        "epochs": _last_version_within(opened, "epochs", PUBLISHER_APP_ID, batch),
        "summaries": _last_version_within(opened, "summaries", SUMMARIZER_APP_ID, version),
    }
    return ButterDataset(opened, versions)


def _latest_consistent(store: Store) -> dict[str, int | None]:
    """The latest versions, except that ``epochs`` ahead of ``runs`` (a publish between its two commits)
    is opened as it was at the last ``runs`` commit: readers never see epochs of unpublished runs."""
    tables = {name: open_table(store, name) for name in TABLE_SCHEMAS}
    versions = {name: (None if table is None else table.version()) for name, table in tables.items()}
    runs, epochs = tables["runs"], tables["epochs"]
    ahead = (
        runs is not None
        and epochs is not None
        and (epochs.transaction_version(PUBLISHER_APP_ID) or 0) > (runs.transaction_version(PUBLISHER_APP_ID) or 0)
    )
    if ahead:
        batch = runs.transaction_version(PUBLISHER_APP_ID) or 0
        versions["epochs"] = _last_version_within(store, "epochs", PUBLISHER_APP_ID, batch)
    return versions
