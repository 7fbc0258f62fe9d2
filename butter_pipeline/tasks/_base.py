"""Where task files come from: the manifest, the cache folder, the package, and a checksummed download.

A task file resolves, in order, from the cache folder (``data_home()``), from the copy shipped inside the
package, and last from its public download location. Every file is checked against the sha256 in the
package manifest before it is read; a download goes to a temporary name and is renamed into the cache
only once its checksum matches.
"""

from __future__ import annotations

import csv
import hashlib
import os
import tempfile
import urllib.request
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from butter_pipeline.errors import DatasetChecksumError, DatasetError

DATA_HOME_ENV = "BUTTER_DATA_HOME"


@dataclass(frozen=True)
class TaskFile:
    """One file of a task, as pinned in the manifest."""

    name: str  # the task (dataset) it belongs to
    file: str
    sha256: str
    size_bytes: int
    rows: int
    features: int
    task: str  # "regression" or "classification": what BUTTER trained
    url: str  # empty when there is no public download location


@cache
def manifest() -> dict[str, tuple[TaskFile, ...]]:
    """The package manifest: task name -> its files."""
    text = (resources.files("butter_pipeline.tasks") / "manifest.tsv").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    files: dict[str, list[TaskFile]] = {}
    for row in csv.DictReader(lines, delimiter="\t"):
        entry = TaskFile(
            name=row["name"],
            file=row["file"],
            sha256=row["sha256"],
            size_bytes=int(row["bytes"]),
            rows=int(row["rows"]),
            features=int(row["features"]),
            task=row["task"],
            url=row["url"],
        )
        files.setdefault(entry.name, []).append(entry)
    return {name: tuple(entries) for name, entries in files.items()}


def data_home(path: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder for task files: the argument, else $BUTTER_DATA_HOME, else ~/.cache/butter."""
    chosen = path or os.environ.get(DATA_HOME_ENV) or Path.home() / ".cache" / "butter" / "datasets"
    return Path(chosen).expanduser()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shipped_path(entry: TaskFile) -> Path | None:
    candidate = resources.files("butter_pipeline.tasks") / "data" / entry.name / entry.file
    return Path(str(candidate)) if candidate.is_file() else None


def _download(entry: TaskFile, target: Path) -> None:
    """Download ``entry`` to ``target`` through a temporary file; never leaves a partial file behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{entry.file}.", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(entry.url, timeout=60) as response:
            while block := response.read(1 << 20):
                out.write(block)
        actual = sha256_of(tmp)
        if actual != entry.sha256:
            raise DatasetChecksumError(
                f"download of {entry.name}/{entry.file} from {entry.url} has sha256 {actual}, "
                f"expected {entry.sha256}; the source changed, so butter will not use it"
            )
        tmp.replace(target)
    except OSError as exc:
        raise DatasetError(
            f"{entry.name}/{entry.file} is not in the cache ({target.parent}) nor shipped, and downloading "
            f"it from {entry.url} failed ({exc}); copy the file into the cache folder and retry"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def resolve_file(entry: TaskFile, *, home: str | os.PathLike[str] | None = None) -> Path:
    """A local path to ``entry`` whose sha256 matches the manifest (cache, then package, then download)."""
    cached = data_home(home) / entry.name / entry.file
    if cached.is_file():
        actual = sha256_of(cached)
        if actual == entry.sha256:
            return cached
        warnings.warn(f"cached {cached} has sha256 {actual}, expected {entry.sha256}; ignoring it", stacklevel=2)
    shipped = _shipped_path(entry)
    if shipped is not None:
        actual = sha256_of(shipped)
        if actual != entry.sha256:
            raise DatasetChecksumError(
                f"shipped file {shipped} has sha256 {actual}, expected {entry.sha256}; reinstall butter"
            )
        return shipped
    if not entry.url:
        raise DatasetError(
            f"{entry.name}/{entry.file} is neither in the cache folder {cached.parent} nor shipped with "
            "butter, and has no download location; copy the file there and retry"
        )
    cached.unlink(missing_ok=True)
    _download(entry, cached)
    return cached


def verify_cached(names: Iterable[str], *, home: str | os.PathLike[str] | None = None) -> None:
    """Refuse, before any work, a cached task file of tasks ``names`` that is not the pinned one.

    ``resolve_file`` alone skips such a file with a warning, which on a Dask worker nobody sees; the cache
    is the user's, so a command that is about to train says so first, in one line.
    """
    for name in sorted(set(names)):
        for entry in manifest().get(name, ()):
            cached = data_home(home) / entry.name / entry.file
            if not cached.is_file():
                continue
            try:
                actual = sha256_of(cached)
            except OSError as exc:
                raise DatasetError(f"dataset {name}: cannot read cached file {cached} ({exc.strerror})") from None
            if actual != entry.sha256:
                raise DatasetChecksumError(
                    f"dataset {name}: cached file {cached} has sha256 {actual}, expected {entry.sha256} "
                    f"(package manifest); delete it, or replace it with the pinned file"
                )
