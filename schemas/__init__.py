"""The data contract: the published tables' Arrow schemas and the pandera models that enforce them.

``schemas/README.md`` documents every column; a test keeps that file, these Arrow schemas and the pandera
models in step. Bump ``SCHEMA_VERSION`` (major for a removed or retyped column, minor for an added one)
whenever a table changes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pyarrow
from pandera.typing import Series

SCHEMA_VERSION = "1.3"
PARTITION_COLUMNS = ("dataset",)
# BUTTER's ten per-epoch metrics, recorded on the train and the test split; ``butter_pipeline.metrics``
# implements them. Named here so that reading the contract needs no torch.
METRICS: tuple[str, ...] = (
    "loss",
    "accuracy",
    "mean_squared_error",
    "mean_absolute_error",
    "root_mean_squared_error",
    "mean_squared_logarithmic_error",
    "hinge",
    "squared_hinge",
    "cosine_similarity",
    "kullback_leibler_divergence",
)
RUN_STATUSES = ("complete", "diverged", "rejected", "failed")
METRIC_COLUMNS: tuple[str, ...] = tuple(f"{side}_{m}" for side in ("train", "test") for m in METRICS)
# Run attributes repeated in every epochs row: they let readers prune a (dataset, shape, depth, size) slice
# of epochs from file and row-group statistics, and cost almost nothing once sorted and run-length encoded.
RUN_KEYS_IN_EPOCHS: tuple[str, ...] = ("experiment_id", "dataset", "shape", "depth", "size")
_UTC_MICROS = pyarrow.timestamp("us", tz="UTC")
# Non-nullable columns added by a minor version, with the value that rows written before them take.
ADDED_COLUMN_DEFAULTS: dict[str, object] = {"attempts": 1}

RUNS_SCHEMA = pyarrow.schema(
    [
        pyarrow.field("run_id", pyarrow.string(), nullable=False),
        pyarrow.field("experiment_id", pyarrow.string(), nullable=False),
        pyarrow.field("repetition", pyarrow.int32(), nullable=False),
        pyarrow.field("seed", pyarrow.int64(), nullable=False),
        pyarrow.field("sweeps", pyarrow.list_(pyarrow.string()), nullable=False),
        pyarrow.field("dataset", pyarrow.string(), nullable=False),
        pyarrow.field("task_type", pyarrow.string(), nullable=False),
        pyarrow.field("shape", pyarrow.string(), nullable=False),
        pyarrow.field("size", pyarrow.int64(), nullable=False),
        pyarrow.field("depth", pyarrow.int32(), nullable=False),
        pyarrow.field("learning_rate", pyarrow.float64(), nullable=False),
        pyarrow.field("batch_size", pyarrow.int32(), nullable=False),
        pyarrow.field("epochs", pyarrow.int32(), nullable=False),
        pyarrow.field("optimizer", pyarrow.string(), nullable=False),
        pyarrow.field("momentum", pyarrow.float64(), nullable=False),
        pyarrow.field("label_noise", pyarrow.float64(), nullable=False),
        pyarrow.field("kernel_regularizer", pyarrow.string(), nullable=True),
        pyarrow.field("kernel_regularizer_strength", pyarrow.float64(), nullable=True),
        pyarrow.field("test_split", pyarrow.float64(), nullable=False),
        pyarrow.field("config_json", pyarrow.string(), nullable=False),
        pyarrow.field("input_width", pyarrow.int32(), nullable=False),
        pyarrow.field("output_width", pyarrow.int32(), nullable=False),
        pyarrow.field("output_activation", pyarrow.string(), nullable=False),
        pyarrow.field("loss_function", pyarrow.string(), nullable=False),
        pyarrow.field("widths", pyarrow.list_(pyarrow.int32()), nullable=True),
        pyarrow.field("num_parameters", pyarrow.int64(), nullable=True),
        pyarrow.field("relative_size_error", pyarrow.float64(), nullable=True),
        pyarrow.field("train_rows", pyarrow.int32(), nullable=False),
        pyarrow.field("test_rows", pyarrow.int32(), nullable=False),
        pyarrow.field("status", pyarrow.string(), nullable=False),
        pyarrow.field("error", pyarrow.string(), nullable=True),
        pyarrow.field("first_diverged_epoch", pyarrow.int32(), nullable=True),
        pyarrow.field("epochs_recorded", pyarrow.int32(), nullable=False),
        pyarrow.field("started_at", _UTC_MICROS, nullable=False),
        pyarrow.field("finished_at", _UTC_MICROS, nullable=False),
        pyarrow.field("train_seconds", pyarrow.float64(), nullable=False),
        pyarrow.field("eval_seconds", pyarrow.float64(), nullable=False),
        pyarrow.field("device", pyarrow.string(), nullable=False),
        pyarrow.field("vector_width", pyarrow.int32(), nullable=False),
        pyarrow.field("host", pyarrow.string(), nullable=False),
        pyarrow.field("worker", pyarrow.string(), nullable=True),
        pyarrow.field("attempts", pyarrow.int32(), nullable=False),
        pyarrow.field("butter_version", pyarrow.string(), nullable=False),
        pyarrow.field("torch_version", pyarrow.string(), nullable=False),
        pyarrow.field("python_version", pyarrow.string(), nullable=False),
        pyarrow.field("schema_version", pyarrow.string(), nullable=False),
    ]
)

EPOCHS_SCHEMA = pyarrow.schema(
    [
        pyarrow.field("run_id", pyarrow.string(), nullable=False),
        pyarrow.field("experiment_id", pyarrow.string(), nullable=False),
        pyarrow.field("dataset", pyarrow.string(), nullable=False),
        pyarrow.field("shape", pyarrow.string(), nullable=False),
        pyarrow.field("depth", pyarrow.int32(), nullable=False),
        pyarrow.field("size", pyarrow.int64(), nullable=False),
        pyarrow.field("epoch", pyarrow.int32(), nullable=False),
        *(pyarrow.field(name, pyarrow.float32(), nullable=True) for name in METRIC_COLUMNS),
    ]
)

# summaries: one row per experiment and epoch, statistics over the experiment's trained repetitions.
LOSS_STATISTICS = ("num_finite", "min", "max", "mean", "std", "q1", "median", "q3")
METRIC_STATISTICS = ("mean", "std", "q1", "median", "q3")
SUMMARIZED_METRICS = ("accuracy", "mean_squared_error", "kullback_leibler_divergence")
BEST_POINTS = ("test_loss_min", "test_accuracy_max")  # per run: lowest test loss / highest test accuracy
BEST_AGGREGATES = ("min", "q1", "median", "q3", "max", "mean")
SUMMARY_EXPERIMENT_COLUMNS = (
    "experiment_id",
    "dataset",
    "task_type",
    "shape",
    "depth",
    "size",
    "num_parameters",
    "learning_rate",
    "batch_size",
    "epochs",
    "optimizer",
    "momentum",
    "label_noise",
    "kernel_regularizer",
    "kernel_regularizer_strength",
    "test_split",
    "sweeps",
)


def _summaries_schema() -> pyarrow.Schema:
    runs = {f.name: f for f in RUNS_SCHEMA}
    fields = [runs[name] for name in SUMMARY_EXPERIMENT_COLUMNS]
    fields += [
        pyarrow.field("num_runs", pyarrow.int32(), nullable=False),
        pyarrow.field("epoch", pyarrow.int32(), nullable=False),
        pyarrow.field("num", pyarrow.int32(), nullable=False),
    ]
    for side in ("train", "test"):
        for stat in LOSS_STATISTICS:
            kind = pyarrow.int32() if stat == "num_finite" else pyarrow.float32()
            fields.append(pyarrow.field(f"{side}_loss_{stat}", kind, nullable=stat != "num_finite"))
        for metric in SUMMARIZED_METRICS:
            fields += [pyarrow.field(f"{side}_{metric}_{stat}", pyarrow.float32()) for stat in METRIC_STATISTICS]
    for best in BEST_POINTS:
        for part in ("epoch", "value"):
            fields += [pyarrow.field(f"{best}_{part}_{agg}", pyarrow.float32()) for agg in BEST_AGGREGATES]
    fields.append(pyarrow.field("runs_version", pyarrow.int64(), nullable=False))
    return pyarrow.schema(fields)


SUMMARIES_SCHEMA = _summaries_schema()

_ID_PATTERN = r"^[0-9a-f]{24}$"


class RunsTable(pa.DataFrameModel):
    """One row per run. Value rules only: Arrow types are fixed by ``RUNS_SCHEMA`` when tables are built."""

    run_id: Series[str] = pa.Field(str_matches=_ID_PATTERN, unique=True)
    experiment_id: Series[str] = pa.Field(str_matches=_ID_PATTERN)
    repetition: Series[np.int32] = pa.Field(ge=0)
    seed: Series[np.int64] = pa.Field(ge=0)
    sweeps: Series[object]
    dataset: Series[str]
    task_type: Series[str] = pa.Field(isin=["regression", "classification"])
    shape: Series[str]
    size: Series[np.int64] = pa.Field(ge=1)
    depth: Series[np.int32] = pa.Field(ge=2)
    learning_rate: Series[np.float64] = pa.Field(gt=0)
    batch_size: Series[np.int32] = pa.Field(ge=1)
    epochs: Series[np.int32] = pa.Field(ge=1)
    optimizer: Series[str] = pa.Field(isin=["adam", "sgd", "rmsprop"])
    momentum: Series[np.float64] = pa.Field(ge=0, lt=1)
    label_noise: Series[np.float64] = pa.Field(ge=0, lt=1)
    kernel_regularizer: Series[str] = pa.Field(isin=["l1", "l2"], nullable=True)
    kernel_regularizer_strength: Series[np.float64] = pa.Field(gt=0, nullable=True)
    test_split: Series[np.float64] = pa.Field(gt=0, lt=1)
    config_json: Series[str] = pa.Field(str_startswith="{")
    input_width: Series[np.int32] = pa.Field(ge=1)
    output_width: Series[np.int32] = pa.Field(ge=1)
    output_activation: Series[str] = pa.Field(isin=["sigmoid", "softmax"])
    loss_function: Series[str] = pa.Field(
        isin=["mean_squared_error", "binary_crossentropy", "categorical_crossentropy"]
    )
    widths: Series[object] = pa.Field(nullable=True)
    num_parameters: Series[pd.Int64Dtype] = pa.Field(ge=1, nullable=True)
    relative_size_error: Series[np.float64] = pa.Field(nullable=True)
    train_rows: Series[np.int32] = pa.Field(ge=0)
    test_rows: Series[np.int32] = pa.Field(ge=0)
    status: Series[str] = pa.Field(isin=list(RUN_STATUSES))
    error: Series[str] = pa.Field(nullable=True)
    first_diverged_epoch: Series[pd.Int32Dtype] = pa.Field(ge=1, nullable=True)
    epochs_recorded: Series[np.int32] = pa.Field(ge=0)
    started_at: Series[pd.DatetimeTZDtype] = pa.Field(dtype_kwargs={"unit": "us", "tz": "UTC"})
    finished_at: Series[pd.DatetimeTZDtype] = pa.Field(dtype_kwargs={"unit": "us", "tz": "UTC"})
    train_seconds: Series[np.float64] = pa.Field(ge=0)
    eval_seconds: Series[np.float64] = pa.Field(ge=0)
    device: Series[str]
    vector_width: Series[np.int32] = pa.Field(ge=1)
    host: Series[str]
    worker: Series[str] = pa.Field(nullable=True)
    attempts: Series[np.int32] = pa.Field(ge=1)
    butter_version: Series[str]
    torch_version: Series[str]
    python_version: Series[str]
    schema_version: Series[str] = pa.Field(isin=[SCHEMA_VERSION])

    class Config:
        strict = True
        ordered = True
        coerce = False

    @pa.dataframe_check(error="complete and diverged runs record every epoch; others record none")
    def epochs_match_status(cls, df: pd.DataFrame) -> pd.Series:
        trained = df["status"].isin(["complete", "diverged"])
        return (trained & (df["epochs_recorded"] == df["epochs"])) | (~trained & (df["epochs_recorded"] == 0))

    @pa.dataframe_check(error="failed and rejected runs carry an error; complete runs do not")
    def error_matches_status(cls, df: pd.DataFrame) -> pd.Series:
        needs_error = df["status"].isin(["failed", "rejected"])
        has_error = df["error"].notna()
        return (needs_error & has_error) | (df["status"].eq("complete") & ~has_error) | df["status"].eq("diverged")

    @pa.dataframe_check(error="first_diverged_epoch is set exactly for diverged runs")
    def divergence_matches_status(cls, df: pd.DataFrame) -> pd.Series:
        return df["first_diverged_epoch"].notna() == df["status"].eq("diverged")


class EpochsTable(pa.DataFrameModel):
    """One row per run and epoch (epoch counted from 1). Metrics may be NaN only in diverged runs."""

    run_id: Series[str] = pa.Field(str_matches=_ID_PATTERN)
    experiment_id: Series[str] = pa.Field(str_matches=_ID_PATTERN)
    dataset: Series[str]
    shape: Series[str]
    depth: Series[np.int32] = pa.Field(ge=2)
    size: Series[np.int64] = pa.Field(ge=1)
    epoch: Series[np.int32] = pa.Field(ge=1)
    train_loss: Series[np.float32] = pa.Field(nullable=True)
    train_accuracy: Series[np.float32] = pa.Field(nullable=True)
    train_mean_squared_error: Series[np.float32] = pa.Field(nullable=True)
    train_mean_absolute_error: Series[np.float32] = pa.Field(nullable=True)
    train_root_mean_squared_error: Series[np.float32] = pa.Field(nullable=True)
    train_mean_squared_logarithmic_error: Series[np.float32] = pa.Field(nullable=True)
    train_hinge: Series[np.float32] = pa.Field(nullable=True)
    train_squared_hinge: Series[np.float32] = pa.Field(nullable=True)
    train_cosine_similarity: Series[np.float32] = pa.Field(nullable=True)
    train_kullback_leibler_divergence: Series[np.float32] = pa.Field(nullable=True)
    test_loss: Series[np.float32] = pa.Field(nullable=True)
    test_accuracy: Series[np.float32] = pa.Field(nullable=True)
    test_mean_squared_error: Series[np.float32] = pa.Field(nullable=True)
    test_mean_absolute_error: Series[np.float32] = pa.Field(nullable=True)
    test_root_mean_squared_error: Series[np.float32] = pa.Field(nullable=True)
    test_mean_squared_logarithmic_error: Series[np.float32] = pa.Field(nullable=True)
    test_hinge: Series[np.float32] = pa.Field(nullable=True)
    test_squared_hinge: Series[np.float32] = pa.Field(nullable=True)
    test_cosine_similarity: Series[np.float32] = pa.Field(nullable=True)
    test_kullback_leibler_divergence: Series[np.float32] = pa.Field(nullable=True)

    class Config:
        strict = True
        ordered = True
        coerce = False
        unique = ["run_id", "epoch"]

    @pa.check("train_accuracy", "test_accuracy", name="accuracy_in_unit_interval")
    def accuracy_in_unit_interval(cls, series: pd.Series) -> pd.Series:
        return series.isna() | series.between(0.0, 1.0)

    @pa.check("train_loss", "test_loss", name="loss_not_negative")
    def loss_not_negative(cls, series: pd.Series) -> pd.Series:
        return series.isna() | (series >= 0)

    @pa.dataframe_check(error="epochs of a run are numbered 1..n without gaps")
    def epochs_contiguous(cls, df: pd.DataFrame) -> bool:
        grouped = df.groupby("run_id")["epoch"]
        return bool(((grouped.max() == grouped.count()) & (grouped.min() == 1)).all())


def frame_for_validation(table: pyarrow.Table) -> pd.DataFrame:
    """The pandas view pandera checks: nullable integer columns keep their integer type."""
    nullable_ints = {pyarrow.int32(): pd.Int32Dtype(), pyarrow.int64(): pd.Int64Dtype()}
    frame = table.to_pandas(types_mapper=None)
    for column in table.schema:
        if column.nullable and column.type in nullable_ints:
            frame[column.name] = pd.array(table.column(column.name).to_pylist(), dtype=nullable_ints[column.type])
    return frame
