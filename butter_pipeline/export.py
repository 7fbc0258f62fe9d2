"""Export in BUTTER's published layout, so that analysis code written for BUTTER reads butter's data.

BUTTER's ``all_repetitions`` directory: one row per run with the experiment's columns and one
``list<float32>`` per metric indexed by epoch, Hive partitions in the order of its per-sweep summaries
(dataset / learning_rate / batch_size / kernel_regularizer_type / label_noise / epochs / shape / depth), at
most 64 runs per file, and a ``_common_metadata`` file holding the schema that readers pass. Column names
follow BUTTER's August-2022 extractor (``test_*`` / ``train_*``, ``kernel_regularizer_l1``); butter's
string ids replace BUTTER's integer ``experiment_id``. Only trained runs (complete, diverged) are exported:
BUTTER published no others. The export goes slice by slice (dataset, shape, depth), so memory stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from butter_pipeline.errors import ExportError
from butter_pipeline.read import ButterDataset
from butter_pipeline.schemas import METRIC_COLUMNS
from butter_pipeline.store import Store

BUTTER_SWEEPS = (
    "primary",
    "300_epoch",
    "30k_epoch",
    "learning_rate",
    "label_noise",
    "batch_size",
    "regularization",
    "optimizer",
)
PARTITIONS = (
    ("dataset", pyarrow.string()),
    ("learning_rate", pyarrow.float32()),
    ("batch_size", pyarrow.uint32()),
    ("kernel_regularizer_type", pyarrow.string()),
    ("label_noise", pyarrow.float32()),
    ("epochs", pyarrow.uint32()),
    ("shape", pyarrow.string()),
    ("depth", pyarrow.uint8()),
)
RUNS_PER_FILE = 64
_RUN_COLUMNS = [
    "run_id",
    "experiment_id",
    "sweeps",
    "dataset",
    "task_type",
    "shape",
    "size",
    "depth",
    "learning_rate",
    "batch_size",
    "epochs",
    "optimizer",
    "momentum",
    "label_noise",
    "kernel_regularizer",
    "kernel_regularizer_strength",
    "test_split",
    "output_activation",
    "widths",
    "num_parameters",
    "seed",
    "status",
    "started_at",
    "finished_at",
    "host",
    "python_version",
    "torch_version",
    "butter_version",
]
BUTTER_SCHEMA = pyarrow.schema(
    [
        pyarrow.field("experiment_id", pyarrow.string()),
        *(pyarrow.field(f"{name}_sweep", pyarrow.bool_()) for name in BUTTER_SWEEPS),
        pyarrow.field("activation", pyarrow.string()),
        pyarrow.field("batch", pyarrow.string()),
        pyarrow.field("input_activation", pyarrow.string()),
        pyarrow.field("kernel_regularizer", pyarrow.string()),
        pyarrow.field("optimizer", pyarrow.string()),
        pyarrow.field("output_activation", pyarrow.string()),
        pyarrow.field("task", pyarrow.string()),
        pyarrow.field("kernel_regularizer_l1", pyarrow.float32()),
        pyarrow.field("kernel_regularizer_l2", pyarrow.float32()),
        pyarrow.field("momentum", pyarrow.float32()),
        pyarrow.field("test_split", pyarrow.float32()),
        pyarrow.field("size", pyarrow.uint64()),
        pyarrow.field("num_free_parameters", pyarrow.uint64()),
        pyarrow.field("widths", pyarrow.list_(pyarrow.uint32())),
        pyarrow.field("run_id", pyarrow.string()),
        pyarrow.field("status", pyarrow.string()),
        pyarrow.field("seed", pyarrow.int64()),
        pyarrow.field("hostname", pyarrow.string()),
        pyarrow.field("python_version", pyarrow.string()),
        pyarrow.field("torch_version", pyarrow.string()),
        pyarrow.field("butter_version", pyarrow.string()),
        pyarrow.field("start_time", pyarrow.int64()),
        pyarrow.field("update_time", pyarrow.int64()),
        *(pyarrow.field(name, pyarrow.list_(pyarrow.float32())) for name in METRIC_COLUMNS),
        *(pyarrow.field(name, kind) for name, kind in PARTITIONS),
    ]
)


@dataclass(frozen=True)
class ExportReport:
    runs: int
    files: int
    path: str


def _butter_rows(runs: pyarrow.Table, epochs: pyarrow.Table) -> pyarrow.Table:
    """One BUTTER row per run of ``runs`` (sorted by run id), metric lists from ``epochs``."""
    runs = runs.sort_by("run_id")
    epochs = epochs.sort_by([("run_id", "ascending"), ("epoch", "ascending")])
    counts = epochs.group_by("run_id").aggregate([("epoch", "count")]).sort_by("run_id")
    if counts["run_id"].to_pylist() != runs["run_id"].to_pylist():
        raise ValueError("every exported run needs its epochs")  # trained runs always have them
    offsets = pyarrow.array(np.concatenate([[0], np.cumsum(counts["epoch_count"].to_numpy())]).astype(np.int32))
    sweeps = runs["sweeps"].to_pylist()
    regularizer = runs["kernel_regularizer"]
    strength = pc.cast(runs["kernel_regularizer_strength"], pyarrow.float32())
    null_float = pyarrow.nulls(runs.num_rows, pyarrow.float32())
    columns = {
        "experiment_id": runs["experiment_id"],
        **{f"{name}_sweep": pyarrow.array([name in s for s in sweeps]) for name in BUTTER_SWEEPS},
        "activation": pyarrow.array(["relu"] * runs.num_rows),
        "batch": pyarrow.array([s[-1] for s in sweeps]),
        "input_activation": pyarrow.array(["relu"] * runs.num_rows),
        "kernel_regularizer": regularizer,
        "optimizer": runs["optimizer"],
        "output_activation": runs["output_activation"],
        "task": runs["task_type"],
        "kernel_regularizer_l1": pc.if_else(pc.equal(regularizer, "l1"), strength, null_float),
        "kernel_regularizer_l2": pc.if_else(pc.equal(regularizer, "l2"), strength, null_float),
        "momentum": runs["momentum"],
        "test_split": runs["test_split"],
        "size": runs["size"],
        "num_free_parameters": runs["num_parameters"],
        "widths": runs["widths"],
        "run_id": runs["run_id"],
        "status": runs["status"],
        "seed": runs["seed"],
        "hostname": runs["host"],
        "python_version": runs["python_version"],
        "torch_version": runs["torch_version"],
        "butter_version": runs["butter_version"],
        "start_time": pc.divide(pc.cast(runs["started_at"], pyarrow.int64()), 1_000_000),
        "update_time": pc.divide(pc.cast(runs["finished_at"], pyarrow.int64()), 1_000_000),
        **{name: pyarrow.ListArray.from_arrays(offsets, epochs[name].combine_chunks()) for name in METRIC_COLUMNS},
        "dataset": runs["dataset"],
        "learning_rate": runs["learning_rate"],
        "batch_size": runs["batch_size"],
        "kernel_regularizer_type": regularizer,
        "label_noise": runs["label_noise"],
        "epochs": runs["epochs"],
        "shape": runs["shape"],
        "depth": runs["depth"],
    }
    return pyarrow.table(columns).cast(BUTTER_SCHEMA)


def export_butter(data: ButterDataset, out: Store) -> ExportReport:
    """Write ``data``'s trained runs in BUTTER's layout under ``out``; returns what was written."""
    if out.fs.exists(out.root) and out.fs.ls(out.root):
        raise ExportError(f"export target {out.uri} is not empty; choose a new or empty folder")
    filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(out.fs))
    partitioning = ds.partitioning(pyarrow.schema(list(PARTITIONS)), flavor="hive")
    trained_statuses = ["complete", "diverged"]
    names = pc.unique(data.runs(columns=["dataset"], where={"status": trained_statuses})["dataset"]).to_pylist()
    exported = files = 0
    for dataset in sorted(names):  # one task's runs in memory at a time, one slice's epochs
        trained = data.runs(columns=_RUN_COLUMNS, where={"status": trained_statuses, "dataset": dataset})
        for key in trained.group_by(["shape", "depth"]).aggregate([]).sort_by("shape").to_pylist():
            where = {"dataset": dataset, **key}
            runs = trained.filter((pc.field("shape") == key["shape"]) & (pc.field("depth") == key["depth"]))
            epochs = data.epochs(columns=["run_id", "epoch", *METRIC_COLUMNS], where=where)
            epochs = epochs.filter(pc.is_in(epochs["run_id"], value_set=runs["run_id"].combine_chunks()))
            written: list[str] = []
            ds.write_dataset(
                _butter_rows(runs, epochs),
                out.root,
                format="parquet",
                partitioning=partitioning,
                filesystem=filesystem,
                basename_template=f"part-{dataset}-{key['shape']}-{key['depth']}-{{i}}.parquet",
                existing_data_behavior="overwrite_or_ignore",
                max_rows_per_file=RUNS_PER_FILE,
                max_rows_per_group=RUNS_PER_FILE,
                file_options=ds.ParquetFileFormat().make_write_options(compression="zstd", compression_level=9),
                file_visitor=lambda f, w=written: w.append(f.path),
            )
            files += len(written)
            exported += runs.num_rows
    with out.fs.open(out.path("_common_metadata"), "wb") as handle:
        pq.write_metadata(BUTTER_SCHEMA, handle)
    return ExportReport(exported, files, out.uri)
