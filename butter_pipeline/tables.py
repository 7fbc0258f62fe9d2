"""How the published Delta tables are laid out: schemas, partitioning, sort order, file sizes, codec, encodings.

Every choice here was measured (``benchmarks/storage.py``, figures in ``docs/performance.md``):

- Partitioned by ``dataset``: a question is almost always about one task.
- Rows are sorted by (shape, depth, size, experiment, run, epoch) inside each file, so that the row groups
  of one (dataset, shape, depth) slice are few and their min/max statistics let readers skip the rest, and
  so that each metric column holds whole learning curves one after the other.
- Float columns use BYTE_STREAM_SPLIT without dictionaries (it halves float32 curves under zstd); string
  and integer columns keep dictionaries, which run-length encode to almost nothing once sorted.
- zstd at level 9 (within 4 % of level 19 in size, several times faster to write).
- Row groups of 32,768 rows: about a megabyte of epochs, small enough that a slice reads little beyond
  itself, large enough for S3 range reads.
- Expired-log cleanup is off, so a release (a table version) stays readable after any number of commits;
  vacuum keeps the files of every release (``maintain.py``).

This module imports no torch and no Prefect: consumers reach it through ``butter_pipeline.read``.
"""

from __future__ import annotations

import pyarrow
import pyarrow.dataset as ds
from deltalake import ColumnProperties, CommitProperties, DeltaTable, Transaction, WriterProperties, write_deltalake
from deltalake.exceptions import TableNotFoundError

from butter_pipeline.schemas import EPOCHS_SCHEMA, PARTITION_COLUMNS, RUNS_SCHEMA, SUMMARIES_SCHEMA
from butter_pipeline.store import Store

TABLE_SCHEMAS: dict[str, pyarrow.Schema] = {"runs": RUNS_SCHEMA, "epochs": EPOCHS_SCHEMA, "summaries": SUMMARIES_SCHEMA}
SORT_KEYS: dict[str, tuple[str, ...]] = {
    "runs": ("shape", "depth", "size", "experiment_id", "run_id"),
    "epochs": ("shape", "depth", "size", "experiment_id", "run_id", "epoch"),
    "summaries": ("shape", "depth", "size", "experiment_id", "epoch"),
}
PUBLISHER_APP_ID = "butter-publisher"  # app transaction on publisher commits: the batch number
SUMMARIZER_APP_ID = "butter-summarizer"  # on a summarize pass's last commit: the runs version it covered
TARGET_FILE_BYTES = 128 * 1024 * 1024
ROW_GROUP_ROWS = 32_768
ZSTD_LEVEL = 9
TABLE_CONFIGURATION = {"delta.enableExpiredLogCleanup": "false"}


def writer_properties(name: str) -> WriterProperties:
    """Codec and per-column encodings for table ``name``."""
    floats = [f.name for f in TABLE_SCHEMAS[name] if pyarrow.types.is_floating(f.type)]
    split = ColumnProperties(dictionary_enabled=False, encoding="BYTE_STREAM_SPLIT")
    return WriterProperties(
        compression="ZSTD",
        compression_level=ZSTD_LEVEL,
        max_row_group_size=ROW_GROUP_ROWS,
        column_properties=dict.fromkeys(floats, split),
    )


def in_layout_order(data: pyarrow.Table, name: str) -> pyarrow.Table:
    """``data`` cast to the table's schema and sorted as its files are."""
    keys = [(column, "ascending") for column in (*PARTITION_COLUMNS, *SORT_KEYS[name])]
    return data.cast(TABLE_SCHEMAS[name]).sort_by(keys)


def open_table(store: Store, name: str, version: int | None = None) -> DeltaTable | None:
    """Table ``name`` of ``store`` (at ``version`` if given), or None when it does not exist yet."""
    try:
        return DeltaTable(store.table_uri(name), version=version, storage_options=store.storage_options or None)
    except TableNotFoundError:
        return None


def arrow_dataset(store: Store, table: DeltaTable, name: str, **options: object) -> ds.Dataset:
    """The lazy pyarrow dataset of ``table`` (table ``name`` of ``store``), read with pyarrow's own IO."""
    return table.to_pyarrow_dataset(filesystem=store.arrow_filesystem(name), **options)


def open_or_create(store: Store, name: str) -> DeltaTable:
    table = open_table(store, name)
    if table is None:
        table = DeltaTable.create(
            store.table_uri(name),
            schema=TABLE_SCHEMAS[name],
            partition_by=list(PARTITION_COLUMNS),
            name=name,
            configuration=TABLE_CONFIGURATION,
            storage_options=store.storage_options or None,
        )
    return table


def append(table: DeltaTable, data: pyarrow.Table, name: str, *, transaction: tuple[str, int] | None = None) -> None:
    """Append ``data`` in the table's layout as one commit, recording ``transaction`` (app id, version)."""
    commit = CommitProperties(app_transactions=[Transaction(*transaction)] if transaction else None)
    # A minor contract version only adds nullable-or-defaulted columns: a table written under an older
    # one gains them (older rows read as null) instead of refusing the append.
    known = set(table.schema().to_arrow().names)
    added = any(field.name not in known for field in TABLE_SCHEMAS[name])
    write_deltalake(
        table,
        in_layout_order(data, name),
        mode="append",
        partition_by=list(PARTITION_COLUMNS),
        target_file_size=TARGET_FILE_BYTES,
        writer_properties=writer_properties(name),
        commit_properties=commit,
        schema_mode="merge" if added else None,
    )
