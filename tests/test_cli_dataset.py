"""The dataset commands: publish, summarize, release, releases, export, maintain; bad input exits 2 in one line."""

from __future__ import annotations

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from test_cli import butter

from butter_pipeline.stage import stage_result
from butter_pipeline.store import open_store
from butter_pipeline.synthetic import synthetic_tables


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-dataset") / "store"
    runs, epochs = synthetic_tables(16, 4, datasets=("529_pollen", "adult"), seed=21)
    stage_result(open_store(folder), "u1", runs, epochs)
    result = butter("publish", "--store", str(folder))
    assert result.returncode == 0, result.stderr
    assert "published 16 runs (64 epoch rows)" in result.stdout
    return folder


def test_summarize_release_export_maintain(published, tmp_path):
    store = str(published)
    result = butter("summarize", "--store", store)
    assert result.returncode == 0 and "summarized" in result.stdout, result.stderr
    result = butter("release", "v1", "--store", store, "--description", "first")
    assert result.returncode == 0 and "release v1: 16 runs, 64 epoch rows" in result.stdout, result.stderr
    result = butter("releases", "--store", store)
    assert result.returncode == 0 and "v1" in result.stdout
    out = tmp_path / "butter-layout"
    result = butter("export", str(out), "--store", store, "--release", "v1")
    assert result.returncode == 0 and "exported 16 runs" in result.stdout, result.stderr
    schema = pq.read_schema(out / "_common_metadata")
    assert ds.dataset(out, format="parquet", partitioning="hive", schema=schema).count_rows() == 16
    result = butter("maintain", "--store", store)
    assert result.returncode == 0 and "epochs:" in result.stdout, result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["release", "bad name!"], "release name 'bad name!'"),
        (["release", "v1"], "already exists"),
        (["export", "{tmp}/x", "--format", "csv"], "--format 'csv'"),
        (["export", "{tmp}/x", "--release", "nope"], "release 'nope' is not in"),
        (["export", "{store}"], "is not empty"),
    ],
)
def test_bad_dataset_input_is_one_line_exit_2(published, tmp_path, args, message):
    if args == ["release", "v1"]:
        butter("release", "v1", "--store", str(published))  # make sure it exists
    args = [a.format(tmp=tmp_path, store=published) for a in args]
    result = butter(*args, "--store", str(published))
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["publish", "summarize", "maintain", "releases"])
def test_commands_never_create_a_missing_store(tmp_path, command):
    missing = tmp_path / "no-such-store"
    result = butter(command, "--store", str(missing))
    assert result.returncode == 2 and "does not exist" in result.stderr, result.stderr
    assert not missing.exists()
