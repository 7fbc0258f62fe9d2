"""BUTTER's per-column preprocessing (reference butter.md §2.1), applied to features and target alike.

Each column, on the full dataset before the train/test split (as BUTTER did, so the min/max of test rows
take part in scaling; docs/fidelity.md records this):

1. one distinct value or none: dropped;
2. exactly two distinct values: one 0/1 column, 1 where the value equals the first row's value;
3. at most 20 distinct values, or not numeric: one-hot, one column per distinct value in sorted order;
4. otherwise: min-max scaled to [0, 1].
"""

from __future__ import annotations

import numpy as np
import pandas as pd

MAX_CATEGORIES = 20


def encode_column(values: pd.Series) -> np.ndarray:
    """Encode one column by BUTTER's rules; returns float32 of shape [rows, k] (k may be 0)."""
    distinct = pd.unique(values)
    if len(distinct) <= 1:
        return np.zeros((len(values), 0), dtype=np.float32)
    if len(distinct) == 2:
        return (values.to_numpy() == values.iloc[0]).astype(np.float32)[:, None]
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    if len(distinct) <= MAX_CATEGORIES or not numeric:
        categories = np.sort(distinct.astype(str) if not numeric else distinct)
        codes = np.searchsorted(categories, values.to_numpy().astype(categories.dtype))
        onehot = np.zeros((len(values), len(categories)), dtype=np.float32)
        onehot[np.arange(len(values)), codes] = 1.0
        return onehot
    column = values.to_numpy(dtype=np.float64)
    low, high = column.min(), column.max()
    return ((column - low) / (high - low)).astype(np.float32)[:, None]


def encode_frame(frame: pd.DataFrame) -> np.ndarray:
    """Encode every column of ``frame`` in order and concatenate: float32 [rows, total width]."""
    parts = [encode_column(frame[name]) for name in frame.columns]
    return np.concatenate(parts, axis=1) if parts else np.zeros((len(frame), 0), dtype=np.float32)
