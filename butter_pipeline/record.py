"""Results -> Arrow tables with the published schemas (``runs``: one row per run; ``epochs``: long form)."""

from __future__ import annotations

import platform
import socket
import sys
from importlib import metadata

import numpy as np
import pyarrow
import torch

from butter_pipeline.ids import canonical_json
from butter_pipeline.membership import butter_sweeps_of
from butter_pipeline.schemas import EPOCHS_SCHEMA, METRIC_COLUMNS, RUNS_SCHEMA, SCHEMA_VERSION
from butter_pipeline.sweep import Run
from butter_pipeline.train import RunResult


def butter_version() -> str:
    try:
        return metadata.version("butter-pipeline")
    except metadata.PackageNotFoundError:
        return "unknown"


def sweeps_of(run: Run) -> list[str]:
    """BUTTER's sweeps the run's experiment belongs to, then the sweep it was trained for."""
    names = butter_sweeps_of(run.experiment)
    return names if run.sweep in names else [*names, run.sweep]


def dask_worker_name() -> str | None:
    """The name of the Dask worker this process is, or None outside Dask (never imports Dask itself)."""
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return None
    try:
        return str(distributed.get_worker().name)
    except ValueError:  # Dask is imported, but this is not one of its workers
        return None


def _run_row(result: RunResult, host: str, worker: str | None, versions: dict[str, str]) -> dict[str, object]:
    run, spec, task, layout = result.run, result.run.experiment, result.task, result.layout
    regularizer = spec.kernel_regularizer
    return {
        "run_id": run.run_id,
        "experiment_id": run.experiment_id,
        "repetition": run.repetition,
        "seed": run.seed,
        "sweeps": sweeps_of(run),
        "dataset": spec.dataset,
        "task_type": task.task_type,
        "shape": spec.shape,
        "size": spec.size,
        "depth": spec.depth,
        "learning_rate": spec.learning_rate,
        "batch_size": spec.batch_size,
        "epochs": spec.epochs,
        "optimizer": spec.optimizer,
        "momentum": spec.momentum,
        "label_noise": spec.label_noise,
        "kernel_regularizer": None if regularizer is None else regularizer.type,
        "kernel_regularizer_strength": None if regularizer is None else regularizer.strength,
        "test_split": spec.test_split,
        "config_json": canonical_json(spec.config()),
        "input_width": task.n_in,
        "output_width": task.n_out,
        "output_activation": task.output_activation,
        "loss_function": task.loss_name,
        "widths": None if layout is None else list(layout.widths),
        "num_parameters": None if layout is None else layout.num_parameters,
        "relative_size_error": None if layout is None else layout.relative_size_error,
        "train_rows": result.train_rows,
        "test_rows": result.test_rows,
        "status": result.status,
        "error": result.error,
        "first_diverged_epoch": result.first_diverged_epoch,
        "epochs_recorded": result.epochs_recorded,
        "started_at": result.started_at,
        "finished_at": result.finished_at,
        "train_seconds": result.train_seconds,
        "eval_seconds": result.eval_seconds,
        "device": result.device,
        "vector_width": result.vector_width,
        "host": host,
        "worker": worker,
        "attempts": result.attempts,
        **versions,
        "schema_version": SCHEMA_VERSION,
    }


def runs_table(results: list[RunResult]) -> pyarrow.Table:
    """The ``runs`` rows of ``results``, typed by ``RUNS_SCHEMA``."""
    versions = {
        "butter_version": butter_version(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version() or sys.version.split()[0],
    }
    host = socket.gethostname()
    worker = dask_worker_name()
    rows = [_run_row(result, host, worker, versions) for result in results]
    return pyarrow.Table.from_pylist(rows, schema=RUNS_SCHEMA)


def epochs_table(results: list[RunResult]) -> pyarrow.Table:
    """The ``epochs`` rows of ``results`` (one per run and epoch, epoch from 1), typed by ``EPOCHS_SCHEMA``."""
    parts = []
    for result in results:
        n = result.epochs_recorded
        if n == 0:
            continue
        columns = {
            "run_id": pyarrow.array([result.run.run_id] * n, pyarrow.string()),
            "experiment_id": pyarrow.array([result.run.experiment_id] * n, pyarrow.string()),
            "dataset": pyarrow.array([result.run.experiment.dataset] * n, pyarrow.string()),
            "shape": pyarrow.array([result.run.experiment.shape] * n, pyarrow.string()),
            "depth": pyarrow.array([result.run.experiment.depth] * n, pyarrow.int32()),
            "size": pyarrow.array([result.run.experiment.size] * n, pyarrow.int64()),
            "epoch": pyarrow.array(np.arange(1, n + 1, dtype=np.int32)),
        }
        for name in METRIC_COLUMNS:
            columns[name] = pyarrow.array(result.history[name].astype(np.float32, copy=False))
        parts.append(pyarrow.table(columns, schema=EPOCHS_SCHEMA))
    if not parts:
        return EPOCHS_SCHEMA.empty_table()
    return pyarrow.concat_tables(parts)
