"""How far each sweep has come, read from the store (published runs plus staged ones), never from Prefect.

The sweep flow's artifacts and ``butter status`` both come from here, so they always agree: done, failed,
remaining, throughput and the time left at that throughput.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow
import pyarrow.compute as pc

from butter_pipeline.stage import RUNS_FILE, STAGING, StagedFileDamaged, read_staged_file, staged_units
from butter_pipeline.store import Store
from butter_pipeline.tables import arrow_dataset, open_table

COLUMNS = ["sweeps", "status", "started_at", "finished_at"]
_EMPTY = pyarrow.schema(
    [
        ("sweeps", pyarrow.list_(pyarrow.string())),
        ("status", pyarrow.string()),
        ("started_at", pyarrow.timestamp("us", tz="UTC")),
        ("finished_at", pyarrow.timestamp("us", tz="UTC")),
    ]
).empty_table()
THROUGHPUT_WINDOW = timedelta(hours=1)
STATUSES = ("complete", "diverged", "rejected", "failed")
HEADER = ("sweep", "planned", "done", *STATUSES, "staged", "remaining", "runs/hour", "time left")


@dataclass
class SweepProgress:
    """One sweep's runs in a store, by status, and its pace over the last hour of finished runs."""

    sweep: str
    planned: int | None = None  # runs in the sweep's spec; None when the spec is not known here
    by_status: Counter[str] = field(default_factory=Counter)  # published runs
    staged: int = 0  # trained and staged, waiting for the publisher
    runs_per_hour: float | None = None
    last_finished: datetime | None = None

    @property
    def done(self) -> int:
        return sum(self.by_status.values()) + self.staged

    @property
    def failed(self) -> int:
        return self.by_status.get("failed", 0)

    @property
    def remaining(self) -> int | None:
        return None if self.planned is None else max(self.planned - self.done, 0)

    @property
    def fraction(self) -> float | None:
        return None if not self.planned else min(self.done / self.planned, 1.0)

    @property
    def seconds_left(self) -> float | None:
        if not self.remaining or not self.runs_per_hour:
            return None
        return self.remaining / self.runs_per_hour * 3600


def _published(store: Store) -> pyarrow.Table:
    table = open_table(store, "runs")
    if table is None:
        return _EMPTY
    return arrow_dataset(store, table, "runs").to_table(columns=COLUMNS)


def _staged(store: Store) -> pyarrow.Table:
    parts = []
    for unit in staged_units(store):
        try:
            parts.append(read_staged_file(store, STAGING, unit, RUNS_FILE, columns=COLUMNS))
        except FileNotFoundError:  # published and removed while we listed: it is in the table now
            continue
        except StagedFileDamaged:  # not done: the planner or the publisher quarantines it
            continue
    return pyarrow.concat_tables(parts) if parts else _EMPTY


def _throughput(finished: pyarrow.Array, started: pyarrow.Array) -> tuple[float | None, datetime | None]:
    """Runs per hour over the last THROUGHPUT_WINDOW of finished runs (or their whole span, if shorter)."""
    if len(finished) == 0:
        return None, None
    last = pc.max(finished).as_py()
    window_start = last - THROUGHPUT_WINDOW
    recent = pc.greater(finished, pyarrow.scalar(window_start, finished.type))
    count = pc.sum(recent).as_py() or 0
    first_start = pc.min(pc.filter(started, recent)).as_py()
    span = (last - max(first_start, window_start)).total_seconds()
    return (count / span * 3600 if span > 0 else None), last


def sweep_progress(store: Store, planned: dict[str, int] | None = None) -> list[SweepProgress]:
    """Progress of every sweep named in ``store``'s runs (and of each sweep in ``planned``, even if empty).

    ``planned`` maps a sweep name to its number of runs (from expanding its spec); a run that belongs to
    several sweeps counts for each.
    """
    planned = planned or {}
    published, staged = _published(store), _staged(store)
    names = set(planned)
    for table in (published, staged):
        names.update(s for s in pc.unique(pc.list_flatten(table["sweeps"])).to_pylist() if s is not None)
    out = []
    for name in sorted(names):
        mine = [_of_sweep(table, name) for table in (published, staged)]
        progress = SweepProgress(name, planned.get(name), staged=mine[1].num_rows)
        counts = pc.value_counts(mine[0]["status"]).flatten() if mine[0].num_rows else None
        if counts is not None:
            progress.by_status.update(dict(zip(counts[0].to_pylist(), counts[1].to_pylist(), strict=True)))
        finished, started = (
            pyarrow.concat_arrays([_timestamps(table[column]) for table in mine])
            for column in ("finished_at", "started_at")
        )
        progress.runs_per_hour, progress.last_finished = _throughput(finished, started)
        out.append(progress)
    return out


def _timestamps(column: pyarrow.ChunkedArray) -> pyarrow.Array:
    return column.combine_chunks().cast(pyarrow.timestamp("us", tz="UTC"))


def _of_sweep(table: pyarrow.Table, name: str) -> pyarrow.Table:
    """Rows whose ``sweeps`` list holds ``name``."""
    mask = np.zeros(table.num_rows, dtype=bool)
    if table.num_rows:
        flat = pc.list_flatten(table["sweeps"]).to_numpy(zero_copy_only=False)
        parents = pc.list_parent_indices(table["sweeps"]).to_numpy()
        mask[parents[flat == name]] = True
    return table.filter(pyarrow.array(mask))


def format_duration(seconds: float) -> str:
    """``seconds`` in the largest unit that gives at least 2 of it: "3.5 hours", "40 seconds"."""
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.0f} seconds"


def as_markdown(progress: list[SweepProgress], store_uri: str, now: datetime | None = None) -> str:
    """The progress table as markdown (the sweep flow's artifact; ``butter status`` prints the same)."""
    now = now or datetime.now(UTC)
    lines = [
        f"# Sweep progress in `{store_uri}`",
        "",
        f"As of {now:%Y-%m-%d %H:%M} UTC, read from the store's tables and staging.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    for p in progress:
        status = p.by_status
        cells = [
            p.sweep,
            "?" if p.planned is None else f"{p.planned:,}",
            f"{p.done:,}" + ("" if p.fraction is None else f" ({p.fraction:.0%})"),
            *(f"{status.get(s, 0):,}" for s in STATUSES),
            f"{p.staged:,}",
            "?" if p.remaining is None else f"{p.remaining:,}",
            "-" if p.runs_per_hour is None else f"{p.runs_per_hour:,.0f}",
            "-" if p.seconds_left is None else format_duration(p.seconds_left),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if not progress:
        lines.append("| (no runs yet) |" + " |" * (len(HEADER) - 1))
    return "\n".join(lines) + "\n"
