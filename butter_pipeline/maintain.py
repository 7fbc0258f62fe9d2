"""Table maintenance: compaction (or z-order), a checkpoint, and vacuum that keeps every release's files.

Each publish adds a few files per dataset partition; compaction rewrites them into files of about
``TARGET_FILE_BYTES`` (or, with z-order, also clusters rows by shape, depth and size across files), in the
tables' own codec and encodings. Vacuum then deletes files no version within the retention needs, except
the files of the versions a release pins. The checkpoint keeps opening a table fast however long its log.
Runs under the publisher lock: compaction must not race a publish.
"""

from __future__ import annotations

from dataclasses import dataclass

from butter_pipeline.publish import publisher_lock
from butter_pipeline.release import released_versions
from butter_pipeline.retry import retrying
from butter_pipeline.store import Store
from butter_pipeline.tables import TABLE_SCHEMAS, TARGET_FILE_BYTES, open_table, writer_properties

DEFAULT_RETENTION_HOURS = 7 * 24  # Delta's default; readers of a non-release version older than this lose it
ZORDER_COLUMNS = ("shape", "depth", "size")


@dataclass(frozen=True)
class TableMaintenance:
    table: str
    files_removed: int  # by compaction
    files_added: int
    files_vacuumed: int
    version: int


def maintain(
    store: Store, *, zorder: bool = False, retention_hours: int = DEFAULT_RETENTION_HOURS
) -> list[TableMaintenance]:
    """Compact (or z-order), checkpoint and vacuum every table of ``store`` (each step may be repeated:
    after a store outage the whole pass is retried)."""
    return retrying(f"store {store.uri}: maintaining the tables", _maintain_once, store, zorder, retention_hours)


def _maintain_once(store: Store, zorder: bool, retention_hours: int) -> list[TableMaintenance]:
    reports = []
    with publisher_lock(store):
        for name in TABLE_SCHEMAS:
            table = open_table(store, name)
            if table is None:
                continue
            options = {"target_size": TARGET_FILE_BYTES, "writer_properties": writer_properties(name)}
            if zorder:
                metrics = table.optimize.z_order(list(ZORDER_COLUMNS), **options)
            else:
                metrics = table.optimize.compact(**options)
            table.create_checkpoint()
            vacuumed = table.vacuum(
                retention_hours=retention_hours,
                dry_run=False,
                enforce_retention_duration=False,
                keep_versions=released_versions(store, name) or None,
            )
            reports.append(
                TableMaintenance(
                    name,
                    int(metrics.get("numFilesRemoved", 0)),
                    int(metrics.get("numFilesAdded", 0)),
                    len(vacuumed),
                    table.version(),
                )
            )
    return reports
