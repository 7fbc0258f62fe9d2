"""The user's path: the `butter` command, end to end, on real tasks, a real Dask cluster and real Prefect."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import duckdb
import numpy as np
import polars as pl
import pyarrow
import pytest
from butter_pipeline.schemas import METRIC_COLUMNS
from deltalake import DeltaTable

from butter_pipeline.read import open_dataset
from butter_pipeline.store import open_store
from butter_pipeline.tables import arrow_dataset

BUTTER = str(Path(sys.executable).parent / "butter")
SMOKE_RUNS, SMOKE_EPOCHS = 12, 20


def butter(
    *args: str, env: dict[str, str] | None = None, timeout: int = 600, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BUTTER, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd
    )


class _Table:
    """A published table read through pyarrow's own filesystem: delta-rs's can abort the interpreter at exit
    (delta-io/delta-rs#2184), which would turn a green test session red."""

    def __init__(self, uri: str, name: str) -> None:
        self.store = open_store(uri, create=False)
        self.name = name
        self.delta = DeltaTable(self.store.table_uri(name), storage_options=self.store.storage_options or None)

    def version(self) -> int:
        return self.delta.version()

    def to_pyarrow_table(self, columns: list[str] | None = None) -> pyarrow.Table:
        return arrow_dataset(self.store, self.delta, self.name).to_table(columns=columns)


def _tables(uri: str) -> tuple[_Table, _Table]:
    return _Table(uri, "runs"), _Table(uri, "epochs")


def _assert_smoke_tables(uri: str) -> None:
    runs, epochs = _tables(uri)
    run_rows = runs.to_pyarrow_table()
    epoch_rows = epochs.to_pyarrow_table()
    assert run_rows.num_rows == SMOKE_RUNS
    assert epoch_rows.num_rows == SMOKE_RUNS * SMOKE_EPOCHS
    assert set(run_rows.column("status").to_pylist()) == {"complete"}
    assert sorted(set(run_rows.column("dataset").to_pylist())) == ["529_pollen", "adult", "wine_quality_white"]
    assert set(epoch_rows.column("epoch").to_pylist()) == set(range(1, SMOKE_EPOCHS + 1))
    for column in ("train_loss", "test_loss", "train_accuracy", "test_accuracy"):
        assert np.isfinite(epoch_rows.column(column).to_numpy()).all(), column
    assert epoch_rows.column_names[-len(METRIC_COLUMNS) :] == list(METRIC_COLUMNS)


@pytest.fixture(scope="module")
def smoke_store(tmp_path_factory, prefect_api_url) -> tuple[Path, subprocess.CompletedProcess]:
    store = tmp_path_factory.mktemp("smoke") / "butter-data"
    result = butter("run", "smoke", "--store", str(store), env={"PREFECT_API_URL": prefect_api_url})
    return store, result


@pytest.mark.integration
def test_run_smoke_into_local_store(smoke_store):
    store, result = smoke_store
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"published {SMOKE_RUNS} runs ({SMOKE_RUNS * SMOKE_EPOCHS} epoch rows" in result.stdout
    assert str(store) in result.stdout
    _assert_smoke_tables(str(store))
    assert not list((store / "staging").glob("*/runs.parquet"))


@pytest.mark.integration
def test_smoke_tables_read_with_pandas_polars_pyarrow_and_duckdb(smoke_store):
    store, _ = smoke_store
    data = open_dataset(str(store))
    frame = data.epochs(columns=["run_id", "epoch", "test_loss"], to="pandas")
    assert len(frame) == SMOKE_RUNS * SMOKE_EPOCHS
    assert pl.read_delta(str(store / "runs")).height == SMOKE_RUNS
    dataset = data.arrow_dataset("epochs")  # noqa: F841 - read by name in the DuckDB query
    per_run = duckdb.sql("select run_id, count(*) as n from dataset group by run_id").fetchall()
    assert len(per_run) == SMOKE_RUNS and {n for _, n in per_run} == {SMOKE_EPOCHS}


@pytest.mark.integration
def test_second_run_trains_nothing_and_adds_nothing(smoke_store, prefect_api_url):
    store, _ = smoke_store
    runs, epochs = _tables(str(store))
    versions = (runs.version(), epochs.version())
    again = butter("run", "smoke", "--store", str(store), env={"PREFECT_API_URL": prefect_api_url})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "12 already in the store, training 0" in again.stderr
    assert "published 0 runs (0 epoch rows)" in again.stdout
    runs, epochs = _tables(str(store))
    assert (runs.version(), epochs.version()) == versions
    _assert_smoke_tables(str(store))


@pytest.mark.integration
@pytest.mark.s3
def test_run_smoke_into_s3(s3_server, prefect_api_url):
    uri = f"s3://{s3_server.bucket}/smoke"
    result = butter("run", "smoke", "--store", uri, env={**s3_server.env(), "PREFECT_API_URL": prefect_api_url})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"published {SMOKE_RUNS} runs" in result.stdout and uri in result.stdout
    with mock.patch.dict(os.environ, s3_server.env()):
        _assert_smoke_tables(uri)
        assert open_dataset(uri).summaries(columns=["epoch"]).num_rows == 6 * SMOKE_EPOCHS  # 6 experiments


@pytest.mark.integration
def test_embedded_default_runs_without_a_prefect_server(tmp_path):
    """The README's first command: no Prefect server configured, a temporary one is started and shared."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    result = subprocess.run(
        [BUTTER, "run", "smoke", "--max-runs", "2", "--workers", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "published 2 runs (40 epoch rows" in result.stdout
    runs, epochs = _tables(str(tmp_path / "butter-data"))
    assert runs.to_pyarrow_table().num_rows == 2 and epochs.to_pyarrow_table().num_rows == 40


@pytest.mark.integration
def test_run_on_an_existing_dask_scheduler(tmp_path, prefect_api_url, monkeypatch):
    from distributed import LocalCluster

    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)  # the workers spawned below inherit it
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        store = tmp_path / "store"
        result = butter(
            "run", "smoke", "--store", str(store), "--max-runs", "2", "--dask-address", cluster.scheduler_address
        )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "published 2 runs (40 epoch rows" in result.stdout
    runs, _ = _tables(str(store))
    assert runs.to_pyarrow_table().num_rows == 2


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "no-such-sweep"], "neither a preset"),
        (["run", "smoke", "--store", "gs://bucket/x"], "unsupported scheme 'gs'"),
        (["run", "smoke", "--store", "s3://Bad_Bucket/x"], "not a valid S3 bucket name"),
        (["plan", "missing.toml"], "missing.toml: no such sweep file"),
        (["run", "smoke", "--dask-address", "notaurl"], "dask scheduler 'notaurl': not an address"),
        (["plan", "[/bold].toml"], "[/bold].toml: no such sweep file"),  # regression: rich markup crashed the error
        (["run", "smoke", "--max-runs", "0"], "Invalid value for '--max-runs'"),
        (
            ["run", "smoke", "--max-runs", "1", "--dask-address", "tcp://127.0.0.1:1"],
            "dask scheduler 'tcp://127.0.0.1:1'",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, expected):
    result = butter(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written: not even an empty store


@pytest.mark.s3
def test_wrong_s3_credentials_are_refused_clearly(s3_server, tmp_path):
    env = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
    result = butter("run", "smoke", "--store", f"s3://{s3_server.bucket}/x", env=env)
    assert result.returncode == 2, result.stderr
    assert f"s3://{s3_server.bucket}/x" in result.stderr and "Traceback" not in result.stderr
    assert "wrong-secret" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"BUTTER_DEVICE": "bogus"}, "BUTTER_DEVICE='bogus' is not a torch device"),
        ({"BUTTER_MEMORY_BUDGET": "abc"}, "BUTTER_MEMORY_BUDGET='abc' must be a positive number"),
    ],
)
def test_bad_environment_is_one_line_and_exit_2(tmp_path, env, expected):
    result = butter("run", "smoke", "--max-runs", "1", env=env, cwd=tmp_path)
    assert result.returncode == 2 and expected in result.stderr
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []


def test_plan_and_sweeps_print_counts():
    result = butter("plan", "smoke")
    assert result.returncode == 0
    assert "6 experiments, 12 runs, 240 run-epochs" in result.stdout
    listing = butter("sweeps")
    assert listing.returncode == 0 and "smoke" in listing.stdout
