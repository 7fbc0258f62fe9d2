"""Loader for PMLB's file format: a gzip-compressed TSV with a header and a ``target`` column."""

from __future__ import annotations

import pandas as pd

from butter_pipeline.errors import DatasetError
from butter_pipeline.tasks._base import TaskFile, resolve_file

TARGET_COLUMN = "target"


def read_pmlb_frame(entry: TaskFile, *, home: str | None = None) -> pd.DataFrame:
    """The raw table of a PMLB task: features then ``target``, as PMLB serves it."""
    path = resolve_file(entry, home=home)
    try:
        frame = pd.read_csv(path, sep="\t", compression="gzip")
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DatasetError(f"{path}: cannot read PMLB table ({exc})") from None
    if TARGET_COLUMN not in frame.columns:
        raise DatasetError(f"{path}: PMLB table has no {TARGET_COLUMN!r} column")
    return frame
