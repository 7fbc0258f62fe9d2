"""Summaries: per experiment and epoch, statistics over the experiment's repetitions (BUTTER's summary table).

``summarize`` is the arithmetic on Arrow tables; ``update_summaries`` keeps the store's ``summaries`` table
current, recomputing only the experiments whose runs changed since its last pass. The pass records the
``runs`` version it covered as the Delta app transaction ``butter-summarizer`` in the same commit as its
last rows, so an interrupted pass is simply done again. The statistics are defined in ``schemas/README.md``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow
import pyarrow.compute as pc
import pyarrow.dataset as ds
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from butter_pipeline.retry import retrying
from butter_pipeline.schemas import (
    BEST_AGGREGATES,
    LOSS_STATISTICS,
    METRIC_STATISTICS,
    PARTITION_COLUMNS,
    SUMMARIES_SCHEMA,
    SUMMARIZED_METRICS,
    SUMMARY_EXPERIMENT_COLUMNS,
)
from butter_pipeline.store import Store
from butter_pipeline.tables import (
    SUMMARIZER_APP_ID,
    TARGET_FILE_BYTES,
    arrow_dataset,
    in_layout_order,
    open_or_create,
    open_table,
    writer_properties,
)

APP_ID = SUMMARIZER_APP_ID
TRAINED = ("complete", "diverged")
EXPERIMENTS_PER_COMMIT = 2000  # bounds memory and the size of the replace predicate
SUMMARY_METRICS = tuple(f"{side}_{metric}" for side in ("train", "test") for metric in ("loss", *SUMMARIZED_METRICS))


@dataclass(frozen=True)
class SummarizeReport:
    experiments: int  # experiments (re)summarized
    rows: int  # summary rows written
    runs_version: int | None  # the runs version the summaries now reflect
    commits: int


class _Groups:
    """Rows grouped by an integer key; per-group order statistics with non-finite values ordered last."""

    def __init__(self, keys: np.ndarray) -> None:
        self.unique, self.index = np.unique(keys, return_inverse=True)
        self.count = np.bincount(self.index, minlength=len(self.unique))
        self.start = np.concatenate([[0], np.cumsum(self.count)[:-1]]).astype(np.int64)

    def statistics(self, values: np.ndarray, wanted: Iterable[str]) -> dict[str, np.ndarray]:
        v = values.astype(np.float64)
        finite = np.isfinite(v)
        n = len(self.unique)
        num_finite = np.bincount(self.index, weights=finite, minlength=n)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.bincount(self.index, weights=np.where(finite, v, 0.0), minlength=n) / num_finite
            deviation = np.where(finite, v - mean[self.index], 0.0)
            var = np.bincount(self.index, weights=deviation * deviation, minlength=n) / (num_finite - 1)
        order = np.lexsort((np.where(finite, v, np.inf), self.index))
        ordered = np.where(finite, v, np.nan)[order]  # within each group: finite ascending, then non-finite
        has = num_finite > 0
        last = self.start + np.maximum(num_finite.astype(np.int64), 1) - 1
        out = {
            "num_finite": num_finite,
            "min": np.where(has, ordered[self.start], np.nan),
            "max": np.where(has, ordered[last], np.nan),
            "mean": np.where(has, mean, np.nan),
            "std": np.where(num_finite >= 2, np.sqrt(np.maximum(var, 0.0)), np.nan),
        }
        for name, p in (("q1", 0.25), ("median", 0.5), ("q3", 0.75)):
            out[name] = self._percentile_cont(ordered, p)
        return {name: out[name] for name in wanted}

    def _percentile_cont(self, ordered: np.ndarray, p: float) -> np.ndarray:
        position = p * (self.count - 1)
        low = np.floor(position).astype(np.int64)
        high = np.minimum(low + 1, self.count - 1)
        fraction = position - low
        a, b = ordered[self.start + low], ordered[self.start + high]
        with np.errstate(invalid="ignore"):
            return np.where(fraction == 0, a, a + (b - a) * fraction)


def _codes(column: pyarrow.ChunkedArray) -> tuple[np.ndarray, pyarrow.Array]:
    encoded = pc.dictionary_encode(column).combine_chunks()
    return encoded.indices.to_numpy().astype(np.int64), encoded.dictionary


def _best_points(epochs: pyarrow.Table) -> pyarrow.Table:
    """Per run: epoch and value of the lowest test loss and of the highest test accuracy (ties: earliest)."""
    runs, run_names = _codes(epochs["run_id"])
    epoch = epochs["epoch"].to_numpy()
    columns: dict[str, object] = {"run_id": run_names}
    for best, metric, sign in (("test_loss_min", "test_loss", 1.0), ("test_accuracy_max", "test_accuracy", -1.0)):
        v = epochs[metric].to_numpy(zero_copy_only=False).astype(np.float64)
        finite = np.isfinite(v)
        order = np.lexsort((epoch, np.where(finite, sign * v, np.inf), runs))
        first = order[np.concatenate([[True], np.diff(runs[order]) != 0])]  # each run's best row, in code order
        columns[f"{best}_epoch"] = np.where(finite[first], epoch[first], np.nan)
        columns[f"{best}_value"] = np.where(finite[first], v[first], np.nan)
    _, first_row = np.unique(runs, return_index=True)
    columns["experiment_id"] = epochs["experiment_id"].take(pyarrow.array(first_row))
    return pyarrow.table(columns)


def _experiments(runs: pyarrow.Table) -> pyarrow.Table:
    """One row of experiment attributes per experiment; ``sweeps`` is the union over its runs."""
    rows: dict[str, dict] = {}
    counts: dict[str, int] = defaultdict(int)
    for row in runs.select([c for c in SUMMARY_EXPERIMENT_COLUMNS]).to_pylist():
        known = rows.setdefault(row["experiment_id"], {**row, "sweeps": []})
        known["sweeps"] = known["sweeps"] + [s for s in row["sweeps"] if s not in known["sweeps"]]
        counts[row["experiment_id"]] += 1
    schema = pyarrow.schema([SUMMARIES_SCHEMA.field(c) for c in SUMMARY_EXPERIMENT_COLUMNS])
    table = pyarrow.Table.from_pylist(list(rows.values()), schema=schema)
    return table.append_column("num_runs", pyarrow.array([counts[e] for e in rows], pyarrow.int32()))


def _as_float32(values: np.ndarray) -> pyarrow.Array:
    """float32 with null where a statistic is undefined (NaN from an empty or too small group)."""
    return pyarrow.array(values.astype(np.float32), mask=np.isnan(values), type=pyarrow.float32())


def summarize(runs: pyarrow.Table, epochs: pyarrow.Table, runs_version: int) -> pyarrow.Table:
    """The ``summaries`` rows of the experiments in ``runs`` (their trained runs' rows in ``epochs``)."""
    runs = runs.filter(pc.is_in(runs["status"], value_set=pyarrow.array(TRAINED)))
    epochs = epochs.filter(pc.is_in(epochs["run_id"], value_set=runs["run_id"].combine_chunks()))
    if epochs.num_rows == 0:
        return SUMMARIES_SCHEMA.empty_table()
    experiments, names = _codes(epochs["experiment_id"])
    epoch = epochs["epoch"].to_numpy().astype(np.int64)
    span = int(epoch.max()) + 1
    groups = _Groups(experiments * span + epoch)
    group_experiment = names.take(pyarrow.array(groups.unique // span))

    columns: dict[str, pyarrow.Array] = {
        "epoch": pyarrow.array((groups.unique % span).astype(np.int32)),
        "num": pyarrow.array(groups.count.astype(np.int32)),
    }
    for metric in SUMMARY_METRICS:
        wanted = LOSS_STATISTICS if metric.endswith("_loss") else METRIC_STATISTICS
        values = epochs[metric].to_numpy(zero_copy_only=False)
        for stat, result in groups.statistics(values, wanted).items():
            if stat == "num_finite":
                columns[f"{metric}_{stat}"] = pyarrow.array(result.astype(np.int32))
            else:
                columns[f"{metric}_{stat}"] = _as_float32(result)

    best = _best_points(epochs)
    best_codes = pc.index_in(best["experiment_id"], value_set=names).to_numpy()
    best_groups = _Groups(best_codes)
    per_experiment: dict[str, np.ndarray] = {}
    for point in ("test_loss_min", "test_accuracy_max"):
        for part in ("epoch", "value"):
            stats = best_groups.statistics(best[f"{point}_{part}"].to_numpy(), BEST_AGGREGATES)
            for agg, result in stats.items():
                full = np.full(len(names), np.nan)
                full[best_groups.unique] = result
                per_experiment[f"{point}_{part}_{agg}"] = full
    group_codes = groups.unique // span
    for name, values in per_experiment.items():
        columns[name] = _as_float32(values[group_codes])

    attributes = _experiments(runs)
    where = pc.index_in(group_experiment, value_set=attributes["experiment_id"])
    table = attributes.take(where)
    for name, column in columns.items():
        table = table.append_column(name, column)
    table = table.append_column("runs_version", pyarrow.array(np.full(table.num_rows, runs_version, np.int64)))
    return table.select(SUMMARIES_SCHEMA.names).cast(SUMMARIES_SCHEMA)


def _added_files(runs: DeltaTable, since: int | None, store: Store) -> ds.Dataset:
    """The part of ``runs`` added after version ``since`` (all of it when ``since`` is None)."""
    dataset = arrow_dataset(store, runs, "runs")
    if since is None:
        return dataset
    before = open_table(store, "runs", version=since)
    old = {uri.rsplit("/", 1)[-1] for uri in (before.file_uris() if before else [])}
    fragments = [f for f in dataset.get_fragments() if f.path.rsplit("/", 1)[-1] not in old]
    return ds.FileSystemDataset(fragments, dataset.schema, dataset.format, dataset.filesystem)


def _changed(runs: DeltaTable, since: int | None, store: Store) -> dict[tuple[str, str, int], list[str]]:
    """Experiments with runs added since ``since``, by (dataset, shape, depth): the slices to re-read."""
    table = _added_files(runs, since, store).to_table(columns=["dataset", "shape", "depth", "experiment_id"])
    slices: dict[tuple[str, str, int], set[str]] = defaultdict(set)
    for dataset, shape, depth, experiment in zip(*(table[c].to_pylist() for c in table.column_names), strict=True):
        slices[(dataset, shape, depth)].add(experiment)
    return {key: sorted(ids) for key, ids in sorted(slices.items())}


def summarize_store(store: Store) -> SummarizeReport:
    """``update_summaries`` under the store's publisher lock, retried across a store outage."""
    from butter_pipeline.publish import publisher_lock

    def locked() -> SummarizeReport:
        with publisher_lock(store):
            return update_summaries(store)

    return retrying(f"store {store.uri}: summarizing", locked)


def update_summaries(store: Store) -> SummarizeReport:
    """Bring ``summaries`` up to the current ``runs`` version, recomputing only changed experiments.

    Callers hold the store's publisher lock (``publish.publisher_lock``): one writer for all tables.
    """
    runs = open_table(store, "runs")
    epochs = open_table(store, "epochs")
    if runs is None or epochs is None:
        return SummarizeReport(0, 0, None, 0)
    current = runs.version()
    summaries = open_or_create(store, "summaries")
    since = summaries.transaction_version(APP_ID)
    if since is not None and since >= current:
        return SummarizeReport(0, 0, since, 0)
    slices = [
        (key, ids[i : i + EXPERIMENTS_PER_COMMIT])
        for key, ids in _changed(runs, since, store).items()
        for i in range(0, len(ids), EXPERIMENTS_PER_COMMIT)
    ]
    runs_data, epochs_data = arrow_dataset(store, runs, "runs"), arrow_dataset(store, epochs, "epochs")
    epoch_columns = ["run_id", "experiment_id", "epoch", *SUMMARY_METRICS]
    experiments = rows = commits = 0
    pending: list[pyarrow.Table] = []
    pending_ids: dict[str, list[str]] = defaultdict(list)  # dataset -> experiments in ``pending``
    for i, ((dataset, shape, depth), ids) in enumerate(slices):
        # read one (dataset, shape, depth) slice at a time: row-group statistics skip the rest
        chosen = (
            (pc.field("dataset") == dataset)
            & (pc.field("shape") == shape)
            & (pc.field("depth") == depth)
            & pc.field("experiment_id").isin(ids)
        )
        summary = summarize(
            runs_data.to_table(filter=chosen), epochs_data.to_table(columns=epoch_columns, filter=chosen), current
        )
        pending.append(summary)
        pending_ids[dataset] += ids
        experiments, rows = experiments + len(ids), rows + summary.num_rows
        last = i == len(slices) - 1
        if last or sum(map(len, pending_ids.values())) >= EXPERIMENTS_PER_COMMIT:
            transaction = (APP_ID, current) if last else None
            _replace(summaries, pyarrow.concat_tables(pending), pending_ids, transaction=transaction)
            commits += 1
            pending, pending_ids = [], defaultdict(list)
    if not slices:  # runs changed without new files (none in practice): still record the version covered
        _replace(summaries, SUMMARIES_SCHEMA.empty_table(), {}, transaction=(APP_ID, current))
        commits += 1
    return SummarizeReport(experiments, rows, current, commits)


def _replace(
    summaries: DeltaTable, rows: pyarrow.Table, experiments: dict[str, list[str]], *, transaction: tuple | None
) -> None:
    """Replace the summary rows of ``experiments`` (dataset -> ids) by ``rows``, in one commit."""
    commit = CommitProperties(app_transactions=[Transaction(*transaction)] if transaction else None)
    options = {
        "partition_by": list(PARTITION_COLUMNS),
        "target_file_size": TARGET_FILE_BYTES,
        "writer_properties": writer_properties("summaries"),
        "commit_properties": commit,
    }
    if not experiments:
        write_deltalake(summaries, rows, mode="append", **options)
        return
    # Ids and dataset names are checked by the data contract ([0-9a-f]{24}, task names), so quoting is safe.
    predicate = " OR ".join(
        f"(dataset = '{dataset}' AND experiment_id IN ({', '.join(repr(i) for i in ids)}))"
        for dataset, ids in sorted(experiments.items())
    )
    write_deltalake(summaries, in_layout_order(rows, "summaries"), mode="overwrite", predicate=predicate, **options)
