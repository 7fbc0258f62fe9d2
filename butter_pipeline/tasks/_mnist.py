"""Loader for MNIST's idx files (train, then test: the 70,000 rows PMLB's mnist table holds)."""

from __future__ import annotations

import gzip

import numpy as np

from butter_pipeline.errors import DatasetError
from butter_pipeline.tasks._base import TaskFile, resolve_file

_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801


def read_idx(entry: TaskFile, *, home: str | None = None) -> np.ndarray:
    """Decode one gzip-compressed idx file: uint8 images [n, 784] or labels [n]."""
    path = resolve_file(entry, home=home)
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic == _IMAGES_MAGIC:
        count, rows, cols = (int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(3))
        data = np.frombuffer(raw, dtype=np.uint8, offset=16)
        return data.reshape(count, rows * cols)
    if magic == _LABELS_MAGIC:
        return np.frombuffer(raw, dtype=np.uint8, offset=8).copy()
    raise DatasetError(f"{path}: not an idx image or label file (magic {magic:#010x})")


def read_mnist(entries: tuple[TaskFile, ...], *, home: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pixels uint8 [70000, 784] and labels uint8 [70000]: the training files, then the test files."""
    by_file = {entry.file: entry for entry in entries}
    images = [read_idx(by_file[f"{part}-images-idx3-ubyte.gz"], home=home) for part in ("train", "t10k")]
    labels = [read_idx(by_file[f"{part}-labels-idx1-ubyte.gz"], home=home) for part in ("train", "t10k")]
    return np.concatenate(images), np.concatenate(labels)
