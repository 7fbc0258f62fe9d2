"""BUTTER's 13 tasks: load a dataset by name as float32 arrays ready to train on.

``load_task(name)`` reads the task's files (cache, package, or a checksummed download), applies BUTTER's
preprocessing and returns a ``Task``. Its ``kind`` decides the output activation and the loss exactly as
BUTTER's ``compute_network_configuration`` did (reference §2.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from butter_pipeline.errors import DatasetError
from butter_pipeline.tasks._base import data_home, manifest, resolve_file, verify_cached
from butter_pipeline.tasks._mnist import read_mnist
from butter_pipeline.tasks._pmlb import TARGET_COLUMN, read_pmlb_frame
from butter_pipeline.tasks.preprocess import encode_frame

DATASETS: tuple[str, ...] = tuple(sorted(manifest()))
# (rows, input width, output width, task type, loss) of each task after preprocessing, as the data contract
# documents them (a test checks both against the loaded data): planning needs the widths of every task of a
# sweep, and loading mnist and sleep just to count their columns costs seconds and hundreds of megabytes.
TASK_FACTS: dict[str, tuple[int, int, int, str, str]] = {
    "201_pol": (15000, 26, 11, "classification", "categorical_crossentropy"),
    "294_satellite_image": (6435, 36, 6, "regression", "mean_squared_error"),
    "505_tecator": (240, 124, 1, "regression", "mean_squared_error"),
    "529_pollen": (3848, 4, 1, "regression", "mean_squared_error"),
    "537_houses": (20640, 8, 1, "regression", "mean_squared_error"),
    "adult": (48842, 81, 1, "classification", "binary_crossentropy"),
    "banana": (5300, 2, 1, "regression", "mean_squared_error"),
    "connect_4": (67557, 126, 3, "classification", "categorical_crossentropy"),
    "mnist": (70000, 784, 10, "classification", "categorical_crossentropy"),
    "nursery": (12958, 26, 4, "classification", "categorical_crossentropy"),
    "sleep": (105908, 141, 5, "classification", "categorical_crossentropy"),
    "splice": (3188, 287, 3, "classification", "categorical_crossentropy"),
    "wine_quality_white": (4898, 11, 7, "classification", "categorical_crossentropy"),
}

__all__ = ["DATASETS", "TASK_FACTS", "Task", "data_home", "load_task", "manifest", "resolve_file", "verify_cached"]


@dataclass(frozen=True, eq=False)
class Task:
    """A preprocessed task. ``x`` float32 [rows, n_in] in [0, 1]; ``y`` float32 [rows, n_out]."""

    name: str
    task_type: str  # "regression" or "classification", as BUTTER trained it
    x: np.ndarray
    y: np.ndarray

    @property
    def n_in(self) -> int:
        return int(self.x.shape[1])

    @property
    def n_out(self) -> int:
        return int(self.y.shape[1])

    @property
    def kind(self) -> str:
        """``regression``, ``binary`` (one 0/1 output) or ``multiclass`` (one-hot outputs)."""
        if self.task_type == "regression":
            return "regression"
        return "binary" if self.n_out == 1 else "multiclass"

    @property
    def output_activation(self) -> str:
        return "softmax" if self.kind == "multiclass" else "sigmoid"

    @property
    def loss_name(self) -> str:
        return {
            "regression": "mean_squared_error",
            "binary": "binary_crossentropy",
            "multiclass": "categorical_crossentropy",
        }[self.kind]


@cache
def load_task(name: str) -> Task:
    """Load and preprocess task ``name`` (once per process; the arrays are shared, never mutate them)."""
    entries = manifest().get(name)
    if entries is None:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    task_type = entries[0].task
    if name == "mnist":
        # BUTTER's mnist loader: pixels / 255 (all 784 columns kept), labels one-hot.
        pixels, labels = read_mnist(entries)
        x = (pixels.astype(np.float32) / np.float32(255.0)).astype(np.float32)
        y = np.eye(10, dtype=np.float32)[labels]
    else:
        frame = read_pmlb_frame(entries[0])
        x = encode_frame(frame.drop(columns=[TARGET_COLUMN]))
        y = encode_frame(frame[[TARGET_COLUMN]])
    x.setflags(write=False)
    y.setflags(write=False)
    return Task(name=name, task_type=task_type, x=x, y=y)
