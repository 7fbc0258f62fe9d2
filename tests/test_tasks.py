"""Task loaders against the shared manifest, file resolution and checksums, and BUTTER's preprocessing."""

from __future__ import annotations

import csv
import gzip
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from butter_pipeline.errors import DatasetChecksumError, DatasetError
from butter_pipeline.tasks import DATASETS, TASK_FACTS, load_task, manifest, resolve_file
from butter_pipeline.tasks._base import TaskFile, sha256_of
from butter_pipeline.tasks._mnist import read_mnist
from butter_pipeline.tasks._pmlb import read_pmlb_frame
from butter_pipeline.tasks.preprocess import encode_column, encode_frame


def _shared_manifest(shared: Path) -> list[dict[str, str]]:
    with open(shared / "MANIFEST.tsv") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_package_manifest_pins_the_shared_files(shared_datasets: Path):
    rows = _shared_manifest(shared_datasets)
    assert len(DATASETS) == 13
    for row in rows:
        entry = next(e for e in manifest()[row["name"]] if e.file == Path(row["file"]).name)
        assert (entry.sha256, entry.size_bytes, entry.rows) == (row["sha256"], int(row["bytes"]), int(row["rows"]))
        assert sha256_of(shared_datasets.parent / row["file"]) == entry.sha256


@pytest.mark.parametrize("name", [n for n in DATASETS if n != "mnist"])
def test_pmlb_loader_matches_manifest_rows_and_columns(name: str, shared_datasets: Path):
    row = next(r for r in _shared_manifest(shared_datasets) if r["name"] == name)
    frame = read_pmlb_frame(manifest()[name][0])
    assert frame.shape == (int(row["rows"]), int(row["features"]) + 1)
    task = load_task(name)
    assert task.x.shape[0] == task.y.shape[0] == int(row["rows"])
    assert task.x.dtype == task.y.dtype == np.float32
    assert task.x.min() >= 0.0 and task.x.max() <= 1.0
    assert np.isfinite(task.x).all() and np.isfinite(task.y).all()


def test_mnist_loader_reads_train_then_test(shared_datasets: Path):
    pixels, labels = read_mnist(manifest()["mnist"])
    assert pixels.shape == (70_000, 784) and labels.shape == (70_000,)
    with gzip.open(shared_datasets / "mnist" / "t10k-labels-idx1-ubyte.gz") as handle:
        test_labels = np.frombuffer(handle.read(), dtype=np.uint8, offset=8)
    assert (labels[60_000:] == test_labels).all()
    task = load_task("mnist")
    assert task.kind == "multiclass" and task.n_in == 784 and task.n_out == 10
    assert task.x.max() == 1.0 and np.allclose(task.y.sum(axis=1), 1.0)


@pytest.mark.parametrize(
    ("name", "kind", "n_out", "loss"),
    [
        ("529_pollen", "regression", 1, "mean_squared_error"),
        ("adult", "binary", 1, "binary_crossentropy"),
        ("201_pol", "multiclass", 11, "categorical_crossentropy"),  # BUTTER forced 201_pol to classification
        ("294_satellite_image", "regression", 6, "mean_squared_error"),  # 6 values -> one-hot, still MSE
        ("banana", "regression", 1, "mean_squared_error"),  # the BUTTER-era file: target -1/+1, regression
        ("connect_4", "multiclass", 3, "categorical_crossentropy"),
    ],
)
def test_task_kinds_follow_butter(name, kind, n_out, loss):
    task = load_task(name)
    assert (task.kind, task.n_out, task.loss_name) == (kind, n_out, loss)


def test_preprocessing_rules_on_small_frames():
    frame = pd.DataFrame(
        {
            "constant": [7, 7, 7, 7],
            "binary": ["b", "a", "b", "a"],
            "few": [3, 1, 2, 3],
            "text": ["x", "y", "z", "x"],
        }
    )
    encoded = encode_frame(frame)
    # constant dropped; binary -> 1 where equal to the first row's value; few -> one-hot (sorted 1,2,3)
    expected = np.array(
        [
            [1, 0, 0, 1, 1, 0, 0],
            [0, 1, 0, 0, 0, 1, 0],
            [1, 0, 1, 0, 0, 0, 1],
            [0, 0, 0, 1, 1, 0, 0],
        ],
        dtype=np.float32,
    )
    assert np.array_equal(encoded, expected)
    many = pd.Series(np.arange(21, dtype=float) * 2 + 10)
    scaled = encode_column(many)
    assert scaled.shape == (21, 1) and scaled.min() == 0.0 and scaled.max() == 1.0
    assert encode_column(pd.Series(np.arange(20.0))).shape == (20, 20)  # 20 distinct: still one-hot


def _fake_entry(tmp_path: Path, content: bytes, url: str = "") -> TaskFile:
    import hashlib

    return TaskFile("toy", "toy.tsv.gz", hashlib.sha256(content).hexdigest(), len(content), 1, 1, "regression", url)


def test_cache_is_used_first_and_a_corrupt_cached_file_is_ignored(tmp_path: Path):
    entry = manifest()["529_pollen"][0]
    cached = tmp_path / "529_pollen" / entry.file
    cached.parent.mkdir(parents=True)
    shutil.copy(resolve_file(entry), cached)
    assert resolve_file(entry, home=tmp_path) == cached
    cached.write_bytes(b"corrupt")
    with pytest.warns(UserWarning, match="sha256"):
        path = resolve_file(entry, home=tmp_path)
    assert path != cached and sha256_of(path) == entry.sha256  # fell back to the shipped copy


def test_missing_file_without_download_source_is_a_clear_error(tmp_path: Path):
    entry = _fake_entry(tmp_path, b"data")
    with pytest.raises(DatasetError, match="neither in the cache folder .* nor shipped"):
        resolve_file(entry, home=tmp_path)


def test_download_with_wrong_checksum_is_refused_and_leaves_nothing(tmp_path: Path):
    source = tmp_path / "served.tsv.gz"
    source.write_bytes(b"not what the manifest pinned")
    entry = _fake_entry(tmp_path, b"the pinned bytes", url=source.as_uri())
    home = tmp_path / "cache"
    with pytest.raises(DatasetChecksumError, match="has sha256 .* expected"):
        resolve_file(entry, home=home)
    assert not any(p.is_file() for p in home.rglob("*"))


def test_download_with_right_checksum_lands_in_the_cache(tmp_path: Path):
    payload = b"the pinned bytes"
    source = tmp_path / "served.tsv.gz"
    source.write_bytes(payload)
    entry = _fake_entry(tmp_path, payload, url=source.as_uri())
    path = resolve_file(entry, home=tmp_path / "cache")
    assert path == tmp_path / "cache" / "toy" / "toy.tsv.gz" and path.read_bytes() == payload


def test_task_widths_are_the_ones_the_data_contract_documents():
    readme = (Path(__file__).resolve().parents[1] / "schemas" / "README.md").read_text()
    section = readme.split("## Task widths", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    documented = {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}
    assert sorted(documented) == sorted(DATASETS)
    for name, (rows_text, n_in, n_out, task_type, loss) in documented.items():
        task = load_task(name)
        actual = [f"{len(task.x):,}", str(task.n_in), str(task.n_out), task.task_type, task.loss_name]
        assert actual == [rows_text, n_in, n_out, task_type, loss], name
        assert TASK_FACTS[name] == (len(task.x), task.n_in, task.n_out, task.task_type, task.loss_name), name
