"""Storage benchmark: bytes per run-epoch, bytes read for a slice, publish throughput, curve read time.

    python benchmarks/storage.py                      # 20,000 runs x 300 epochs, local folder and SeaweedFS
    python benchmarks/storage.py --runs 2000 --epochs 100 --stores local

Synthetic tables (``butter_pipeline.synthetic``: curves shaped like training curves, noise like real
runs) are staged, then published by the real publisher; the figures are read from the Delta log and from
a filesystem wrapper that counts the bytes a read fetches. ``--real`` also trains a few real runs and
writes their epochs with the same layout, to compare real and synthetic bytes per run-epoch.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from contextlib import ExitStack

import numpy as np
import pyarrow
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from butter_pipeline.maintain import maintain
from butter_pipeline.publish import publish
from butter_pipeline.read import open_dataset
from butter_pipeline.s3server import seaweedfs
from butter_pipeline.stage import stage_result
from butter_pipeline.store import Store, open_store
from butter_pipeline.synthetic import synthetic_tables
from butter_pipeline.tables import ZSTD_LEVEL, open_table

RUNS_PER_UNIT = 50  # like a vectorized group: a few dozen runs per staged unit


class CountingHandler(pafs.FSSpecHandler):
    """An fsspec-backed pyarrow filesystem handler that counts the bytes read through it."""

    def __init__(self, fs) -> None:
        super().__init__(fs)
        self.bytes_read = 0

    def open_input_file(self, path: str):
        handler = self

        class Counted:
            def __init__(self, handle) -> None:
                self.handle = handle

            def read(self, size: int = -1) -> bytes:
                data = self.handle.read(size)
                handler.bytes_read += len(data)
                return data

            def __getattr__(self, name: str):
                return getattr(self.handle, name)

        return pyarrow.PythonFile(Counted(self.fs.open(path, mode="rb")), mode="r")


def _table_bytes(store: Store, name: str) -> int:
    table = open_table(store, name)
    return int(pc.sum(pyarrow.table(table.get_add_actions(flatten=True))["size_bytes"]).as_py())


def _stage(store: Store, runs: pyarrow.Table, epochs: pyarrow.Table) -> None:
    ids = runs["run_id"].combine_chunks()
    order = pc.sort_indices(epochs, [("run_id", "ascending")])
    epochs = epochs.take(order)
    for start in range(0, len(ids), RUNS_PER_UNIT):
        chosen = ids[start : start + RUNS_PER_UNIT]
        stage_result(
            store,
            f"bench{start:07d}",
            runs.filter(pc.is_in(runs["run_id"], value_set=chosen)),
            epochs.filter(pc.is_in(epochs["run_id"], value_set=chosen)),
        )


def _slice_fraction(store: Store, where: dict) -> tuple[float, int]:
    """Fraction of the epochs table's bytes fetched to read one slice, and the rows it returned."""
    data = open_dataset(store.uri)
    counting = CountingHandler(store.fs)
    filesystem = pafs.SubTreeFileSystem(store.path("epochs"), pafs.PyFileSystem(counting))
    dataset = data.arrow_dataset("epochs", filesystem=filesystem)
    expression = None
    for key, value in where.items():
        term = pc.field(key) == value
        expression = term if expression is None else expression & term
    rows = dataset.to_table(filter=expression).num_rows
    return counting.bytes_read / _table_bytes(store, "epochs"), rows


def _measure(store: Store, runs: pyarrow.Table, epochs: pyarrow.Table) -> dict[str, float]:
    started = time.perf_counter()
    _stage(store, runs, epochs)
    staged = time.perf_counter()
    report = publish(store)
    published = time.perf_counter()
    run_epochs = epochs.num_rows
    figures = {
        "stage_s": staged - started,
        "publish_s": published - staged,
        "publish_run_epochs_per_s": run_epochs / (published - staged),
        "commits": report.commits,
        "epochs_bytes_per_run_epoch": _table_bytes(store, "epochs") / run_epochs,
        "all_bytes_per_run_epoch": (_table_bytes(store, "epochs") + _table_bytes(store, "runs")) / run_epochs,
    }
    # the slice a reader asks most: one dataset, shape and depth (the commonest such combination here)
    counts = runs.group_by(["dataset", "shape", "depth"]).aggregate([("run_id", "count")])
    top = counts.sort_by([("run_id_count", "descending")]).slice(0, 1).to_pylist()[0]
    where = {"dataset": top["dataset"], "shape": top["shape"], "depth": top["depth"]}
    figures["slice_rows_fraction"] = top["run_id_count"] / runs.num_rows
    figures["slice_bytes_fraction"], _ = _slice_fraction(store, where)
    data = open_dataset(store.uri)
    experiments = runs["experiment_id"].to_pylist()[:: max(1, runs.num_rows // 7)][:7]
    times = []
    for experiment in experiments:
        t0 = time.perf_counter()
        data.experiment_curves(experiment, columns=["run_id", "epoch", "test_loss", "train_loss"])
        times.append(time.perf_counter() - t0)
    figures["experiment_curves_median_s"] = statistics.median(times)
    t0 = time.perf_counter()
    maintain(store)
    figures["maintain_s"] = time.perf_counter() - t0
    figures["compacted_epochs_bytes_per_run_epoch"] = _table_bytes(store, "epochs") / run_epochs
    figures["compacted_slice_bytes_fraction"], _ = _slice_fraction(store, where)
    return figures


def _real_bytes_per_run_epoch(folder: str) -> tuple[float, int]:
    """Train a few real runs (three tasks, 150 epochs) and publish them; bytes per run-epoch of epochs."""
    from butter_pipeline.record import epochs_table, runs_table
    from butter_pipeline.sweep import parse_spec, plan_runs
    from butter_pipeline.vtrain import group_runs, train_runs

    grid = {
        "dataset": ["529_pollen", "wine_quality_white", "201_pol"],
        "shape": "rectangle",
        "size": [1024, 8192],
        "depth": 3,
        "learning_rate": 0.001,
        "batch_size": 256,
        "epochs": 150,
    }
    spec = parse_spec({"name": "real", "repetitions": 4, "grid": grid}, source="benchmark")
    results = [r for group in group_runs(list(plan_runs(spec))) for r in train_runs(group)]
    store = open_store(folder)
    epochs = epochs_table(results)
    stage_result(store, "real", runs_table(results), epochs)
    publish(store)
    run_epochs = sum(r.epochs_recorded for r in results)
    _print_precision_trade_off(epochs)
    _print_butter_layout(epochs)
    return _table_bytes(store, "epochs") / run_epochs, run_epochs


def _rounded(values: np.ndarray, bits: int) -> np.ndarray:
    """float32 ``values`` rounded to ``bits`` mantissa bits (round half to even); non-finite kept."""
    raw = values.astype(np.float32).view(np.uint32)
    drop = np.uint32(23 - bits)
    half = np.uint32(1 << (23 - bits - 1)) - np.uint32(1)
    rounded = ((raw + half + ((raw >> drop) & np.uint32(1))) & ~np.uint32((1 << (23 - bits)) - 1)).view(np.float32)
    return np.where(np.isfinite(values) & np.isfinite(rounded), rounded, values)


def _print_precision_trade_off(epochs: pyarrow.Table) -> None:
    """What rounding the metrics (not done by butter) would save: bytes per run-epoch of real curves."""
    floats = [f.name for f in epochs.schema if pyarrow.types.is_floating(f.type)]
    ordered = epochs.sort_by([("run_id", "ascending"), ("epoch", "ascending")])
    for bits in (23, 16, 12, 10):
        table = ordered
        for name in floats:
            values = _rounded(table[name].to_numpy(zero_copy_only=False), bits) if bits < 23 else table[name]
            table = table.set_column(table.schema.get_field_index(name), name, pyarrow.array(values, pyarrow.float32()))
        sink = io.BytesIO()
        pq.write_table(
            table,
            sink,
            compression="zstd",
            compression_level=ZSTD_LEVEL,
            use_byte_stream_split=floats,
            use_dictionary=[c for c in table.column_names if c not in floats],
        )
        error = 2.0 ** -(bits + 1)
        print(
            f"  {bits:2d} mantissa bits (relative error <= {error:.1e}): {len(sink.getvalue()) / table.num_rows:.1f} B"
        )


def _print_butter_layout(epochs: pyarrow.Table) -> None:
    """The same curves in BUTTER's own layout (one row per run, a list<float32> per metric, Brotli 7)."""
    floats = [f.name for f in epochs.schema if pyarrow.types.is_floating(f.type)]
    ordered = epochs.sort_by([("run_id", "ascending"), ("epoch", "ascending")])
    per_run = ordered.group_by("run_id", use_threads=False).aggregate([(name, "list") for name in floats])
    sink = io.BytesIO()
    pq.write_table(per_run, sink, compression="brotli", compression_level=7)
    per_run_epoch = len(sink.getvalue()) / epochs.num_rows
    print(f"  BUTTER's layout of the same curves (list<float32>, brotli 7): {per_run_epoch:.1f} B")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--stores", default="local,s3", help="comma-separated: local, s3; empty for none")
    parser.add_argument("--real", action="store_true", help="also measure real training curves")
    args = parser.parse_args()

    t0 = time.perf_counter()
    runs, epochs = synthetic_tables(args.runs, args.epochs, repetitions=4, seed=0)
    print(f"synthetic: {runs.num_rows:,} runs, {epochs.num_rows:,} run-epochs ({time.perf_counter() - t0:.0f} s)")
    with ExitStack() as stack:
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="butter-storage-"))
        for kind in filter(None, args.stores.split(",")):
            if kind == "local":
                store = open_store(os.path.join(folder, "local"))
            else:
                server = stack.enter_context(seaweedfs())
                os.environ.update(server.env())
                store = open_store(f"s3://{server.bucket}/storage-bench")
            figures = _measure(store, runs, epochs)
            print(f"\n{kind}:")
            for name, value in figures.items():
                print(f"  {name:40s} {value:,.4g}")
        if args.real:
            print("\nreal curves, epochs written as one file, by metric precision:")
            per_run_epoch, rows = _real_bytes_per_run_epoch(os.path.join(folder, "real"))
            print(f"real curves: {per_run_epoch:.1f} bytes per run-epoch over {rows:,} run-epochs (published)")


if __name__ == "__main__":
    main()
