"""The published dataset: releases, the read API, maintenance, BUTTER export and crash safety of publishing.

Every test runs on a local folder and on the SeaweedFS server the session starts.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from butter_pipeline.schemas import METRIC_COLUMNS

from butter_pipeline.errors import ExportError, ReadError, ReleaseError
from butter_pipeline.export import export_butter
from butter_pipeline.failpoints import FAILPOINT_EXIT_STATUS
from butter_pipeline.maintain import maintain
from butter_pipeline.publish import publish
from butter_pipeline.read import open_dataset
from butter_pipeline.release import create_release, list_releases
from butter_pipeline.stage import stage_result, staged_units
from butter_pipeline.store import open_store
from butter_pipeline.synthetic import synthetic_tables
from butter_pipeline.tables import arrow_dataset, open_table

DATASETS = ("529_pollen", "mnist", "adult")


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(tmp_path / "store")
    s3 = request.getfixturevalue("s3_env")
    return open_store(f"s3://{s3.bucket}/dataset-{os.urandom(4).hex()}")


def _stage(store, runs, epochs, unit_size=8, prefix="u"):
    ids = runs["run_id"].to_pylist()
    for start in range(0, len(ids), unit_size):
        chosen = pyarrow.array(ids[start : start + unit_size])
        outcome = stage_result(
            store,
            f"{prefix}{start:06d}",
            runs.filter(pc.is_in(runs["run_id"], value_set=chosen)),
            epochs.filter(pc.is_in(epochs["run_id"], value_set=chosen)),
        )
        assert outcome.status == "staged"


def _land(store, seed, runs=24, epochs=6):
    tables = synthetic_tables(runs, epochs, datasets=DATASETS, diverged_fraction=0.1, seed=seed)
    _stage(store, *tables, prefix=f"s{seed}-")
    publish(store)
    return tables


def test_release_returns_its_rows_only_after_more_data_lands(store):
    first_runs, first_epochs = _land(store, seed=1)
    manifest = create_release(store, "r1", description="first")
    assert manifest["rows"]["epochs"] == first_epochs.num_rows
    assert sum(manifest["runs_by_status"].values()) == first_runs.num_rows
    assert manifest["sweeps"] == ["synthetic"] and manifest["rows"]["summaries"] > 0
    _land(store, seed=2)
    maintain(store)  # compaction and vacuum must keep the release readable
    maintain(store, zorder=True, retention_hours=0)

    released = open_dataset(store.uri, release="r1")
    assert sorted(released.runs(columns=["run_id"])["run_id"].to_pylist()) == sorted(first_runs["run_id"].to_pylist())
    assert released.epochs(columns=["run_id"]).num_rows == first_epochs.num_rows
    assert set(released.summaries(columns=["experiment_id"])["experiment_id"].to_pylist()) == set(
        first_runs["experiment_id"].to_pylist()
    )
    latest = open_dataset(store.uri)
    assert latest.runs().num_rows == 2 * first_runs.num_rows
    # a runs version number opens the state of that moment, epochs included
    as_of = open_dataset(store.uri, version=manifest["versions"]["runs"])
    assert as_of.runs().num_rows == first_runs.num_rows
    assert as_of.epochs(columns=["epoch"]).num_rows == first_epochs.num_rows

    assert [m["name"] for m in list_releases(store)] == ["r1"]
    with pytest.raises(ReleaseError, match="already exists"):
        create_release(store, "r1")
    with pytest.raises(ReleaseError, match="release name"):
        create_release(store, "../escape")
    with pytest.raises(ReleaseError, match="not in"):
        open_dataset(store.uri, release="missing")


def test_read_api_filters_and_formats(store):
    runs, epochs = _land(store, seed=3)
    data = open_dataset(store.uri)
    key = runs.slice(0, 1).to_pylist()[0]
    where = {"dataset": key["dataset"], "shape": key["shape"], "depth": key["depth"]}
    chosen = [pc.field(name) == key[name] for name in ("dataset", "shape", "depth")]
    expected = epochs.filter(chosen[0] & chosen[1] & chosen[2])
    arrow = data.epochs(columns=["run_id", "epoch", "test_loss"], where=where)
    assert arrow.num_rows == expected.num_rows > 0 and arrow.column_names == ["run_id", "epoch", "test_loss"]
    assert len(data.epochs(columns=["epoch"], where=where, to="pandas")) == expected.num_rows
    assert data.epochs(columns=["epoch"], where=where, to="polars").height == expected.num_rows
    relation = data.epochs(columns=["run_id", "test_loss"], where=where, to="duckdb")
    assert relation.aggregate("count(*)").fetchall()[0][0] == expected.num_rows
    # a run attribute that epochs do not repeat is resolved through runs
    assert data.epochs(columns=["epoch"], where={"learning_rate": 0.0001}).num_rows == epochs.num_rows
    assert data.epochs(columns=["epoch"], where={"learning_rate": 0.5}).num_rows == 0
    curves = data.experiment_curves(key["experiment_id"], columns=["run_id", "epoch", "test_loss"])
    assert curves.num_rows == epochs.filter(pc.field("experiment_id") == key["experiment_id"]).num_rows
    with pytest.raises(ReadError, match="no column 'nope'"):
        data.runs(columns=["nope"])
    with pytest.raises(ReadError, match="no column 'nope'"):
        data.epochs(where={"nope": 1})
    with pytest.raises(ReadError, match="no version 99"):
        open_dataset(store.uri, version=99)


def test_export_in_butter_layout_reads_back_with_plain_pyarrow(store, tmp_path):
    runs, epochs = _land(store, seed=4)
    target = open_store(tmp_path / "export")
    report = export_butter(open_dataset(store.uri), target)
    trained = runs.filter(pc.is_in(runs["status"], value_set=pyarrow.array(["complete", "diverged"])))
    assert report.runs == trained.num_rows
    schema = pq.read_schema(tmp_path / "export" / "_common_metadata")
    table = ds.dataset(tmp_path / "export", format="parquet", partitioning="hive", schema=schema).to_table()
    assert table.num_rows == trained.num_rows
    assert {"primary_sweep", "kernel_regularizer_type", "test_loss", "train_accuracy", "num_free_parameters"} <= set(
        table.column_names
    )
    for row in table.slice(0, 5).to_pylist():
        mine = epochs.filter(pc.field("run_id") == row["run_id"]).sort_by("epoch")
        for name in METRIC_COLUMNS:
            np.testing.assert_array_equal(np.array(row[name], np.float32), mine[name].to_numpy(zero_copy_only=False))
        assert row["dataset"] == mine["dataset"][0].as_py() and row["depth"] == mine["depth"][0].as_py()
    with pytest.raises(ExportError, match="not empty"):
        export_butter(open_dataset(store.uri), target)


@pytest.mark.parametrize("point", ["publish:before-commit", "publish:between-commits", "publish:before-cleanup"])
def test_publisher_killed_mid_publish_then_rerun_leaves_one_copy(store, point, s3_server):
    runs, epochs = synthetic_tables(16, 5, datasets=DATASETS, seed=5)
    _stage(store, runs, epochs)
    code = (
        "from butter_pipeline.publish import publish; from butter_pipeline.store import open_store; "
        f"publish(open_store({store.uri!r}))"
    )
    env = {**os.environ, **s3_server.env(), "BUTTER_FAILPOINT": point}
    killed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == FAILPOINT_EXIT_STATUS, killed.stderr
    # readers see either nothing of the batch or all of it: runs only ever appear with their epochs
    data = open_dataset(store.uri)
    visible_runs = data.runs(columns=["run_id"]).num_rows if open_table(store, "runs") else 0
    assert visible_runs in (0, runs.num_rows)
    if visible_runs == 0:  # killed before the runs commit: no epochs either, even those already committed
        committed = arrow_dataset(store, open_table(store, "epochs"), "epochs").count_rows()
        assert committed == (epochs.num_rows if point == "publish:between-commits" else 0)
        assert data.epochs(columns=["run_id"]).num_rows == 0
    else:
        assert data.epochs(columns=["run_id"]).num_rows == epochs.num_rows
    report = publish(store)
    assert staged_units(store) == []
    stored_runs = open_dataset(store.uri).runs(columns=["run_id"])["run_id"].to_pylist()
    assert sorted(stored_runs) == sorted(runs["run_id"].to_pylist())  # each run exactly once
    assert open_dataset(store.uri).epochs(columns=["run_id"]).num_rows == epochs.num_rows
    assert report.runs_added == (0 if point == "publish:before-cleanup" else runs.num_rows)


def test_ten_thousand_staged_runs_publish_in_two_commits(tmp_path):
    store = open_store(tmp_path / "store")
    runs, epochs = synthetic_tables(10_000, 2, datasets=DATASETS, seed=6)
    _stage(store, runs, epochs, unit_size=500)
    report = publish(store)
    assert (report.runs_added, report.commits) == (10_000, 2)  # one commit per table
    assert open_dataset(store.uri).epochs(columns=["epoch"]).num_rows == 20_000


def test_reading_needs_neither_torch_nor_prefect(tmp_path):
    store = open_store(tmp_path / "store")
    _land(store, seed=7)
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['prefect'] = None\n"
        "from butter_pipeline.read import open_dataset\n"
        f"data = open_dataset({store.uri!r})\n"
        "print(data.runs().num_rows, data.epochs(columns=['epoch']).num_rows)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["24", str(24 * 6)]
