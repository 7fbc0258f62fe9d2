"""Faults survived and nothing lost: diverged training as data, corrupted staging, killed workers, an S3
outage in the middle of a sweep."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow
import pyarrow.compute as pc
import pytest
from butter_pipeline.schemas import METRIC_COLUMNS

from butter_pipeline.execute import run_chunk
from butter_pipeline.publish import publish
from butter_pipeline.read import open_dataset
from butter_pipeline.s3server import seaweedfs_process
from butter_pipeline.stage import quarantined_units, stage_result, staged_units
from butter_pipeline.store import open_store
from butter_pipeline.summarize import update_summaries
from butter_pipeline.sweep import parse_spec, plan_runs
from butter_pipeline.synthetic import synthetic_tables

BUTTER = str(Path(sys.executable).parent / "butter")
OUTAGE_SECONDS = 30  # longer than botocore's own retries inside a request (seconds), so butter's are needed


def _spec(name: str, **grid: object):
    base = {"dataset": "wine_quality_white", "shape": "rectangle", "size": 1024, "depth": 3, "epochs": 5}
    return parse_spec({"name": name, "repetitions": 2, "grid": {**base, **grid}}, source=f"{name}.toml")


def test_a_learning_rate_that_diverges_is_published_as_diverged_data(tmp_path):
    """SGD at 1e12 diverges in the first epochs: the runs complete, are recorded as `diverged` with the first
    diverged epoch, their non-finite values are published as they are, and summaries skip them."""
    store = open_store(tmp_path / "store")
    runs = list(plan_runs(_spec("diverge", optimizer="sgd", learning_rate=[1e12, 1e-3])))
    counts = run_chunk(store.uri, runs)
    assert counts["status:diverged"] == 2 and counts["status:complete"] == 2
    publish(store)
    update_summaries(store)

    data = open_dataset(store.uri)
    table = data.runs(columns=["run_id", "learning_rate", "status", "first_diverged_epoch"], to="pandas")
    diverged = table[table["learning_rate"] == 1e12]
    assert set(diverged["status"]) == {"diverged"} and diverged["first_diverged_epoch"].between(1, 5).all()
    assert set(table[table["learning_rate"] == 1e-3]["status"]) == {"complete"}
    epochs = data.epochs(columns=["run_id", "epoch", *METRIC_COLUMNS], to="pandas")
    for run_id, first in zip(diverged["run_id"], diverged["first_diverged_epoch"].astype(int), strict=True):
        curve = epochs[epochs["run_id"] == run_id].sort_values("epoch")
        assert len(curve) == 5  # every epoch is recorded, after the divergence too
        assert not np.isfinite(curve["train_loss"].to_numpy()[first - 1 :]).all()
        assert np.isfinite(curve["train_loss"].to_numpy()[: first - 1]).all()
    assert np.isfinite(epochs[~epochs["run_id"].isin(diverged["run_id"])][list(METRIC_COLUMNS)].to_numpy()).all()
    summaries = data.summaries(columns=["learning_rate", "epoch", "num_runs", "test_loss_num_finite"], to="pandas")
    stable = summaries[summaries["learning_rate"] == 1e-3]
    assert (stable["test_loss_num_finite"] == 2).all()


def test_a_non_finite_metric_in_a_run_not_marked_diverged_is_quarantined(tmp_path):
    """The contract allows NaN and infinity only in diverged runs, in every metric column."""
    store = open_store(tmp_path / "store")
    runs, epochs = synthetic_tables(2, 4, datasets=("adult",), seed=2)
    for column in ("test_hinge", "train_cosine_similarity"):
        values = epochs[column].to_numpy(zero_copy_only=False).copy()
        values[3] = np.inf
        broken = epochs.set_column(
            epochs.schema.get_field_index(column), epochs.schema.field(column), pyarrow.array(values, pyarrow.float32())
        )
        outcome = stage_result(store, f"bad-{column}", runs, broken)
        assert outcome.status == "quarantined", column
    assert staged_units(store) == [] and len(quarantined_units(store)) == 2
    report = (tmp_path / "store" / "quarantine" / "bad-test_hinge" / "report.json").read_text()
    assert "finite_unless_diverged" in report
    publish(store)
    assert open_dataset(store.uri).runs(columns=["run_id"]).num_rows == 0
    assert pc.sum(pc.is_nan(epochs["test_loss"])).as_py() == 0  # the originals were finite


def test_damaged_staged_files_are_quarantined_with_a_report_and_retrained_on_resume(tmp_path):
    """One unit's epochs file truncated, another's runs file overwritten with junk: the publisher commits the
    good unit, quarantines both damaged ones with a report, and a resumed sweep trains exactly their runs."""
    import json

    from butter_pipeline.execute import unit_id
    from butter_pipeline.plan import done_run_ids
    from butter_pipeline.vtrain import group_runs

    store = open_store(tmp_path / "store")
    runs = list(plan_runs(_spec("damaged", size=[512, 1024, 2048])))
    groups = group_runs(runs)
    assert len(groups) == 3
    run_chunk(store.uri, runs)
    folder = tmp_path / "store" / "staging"
    truncated, junk, good = (unit_id(group) for group in groups)
    epochs_file = folder / truncated / "epochs.parquet"
    epochs_file.write_bytes(epochs_file.read_bytes()[: epochs_file.stat().st_size // 2])
    (folder / junk / "runs.parquet").write_bytes(b"not parquet at all" * 20)

    report = publish(store)
    assert report.runs_added == 2  # the good unit's two runs
    assert sorted(quarantined_units(store)) == sorted([truncated, junk]) and staged_units(store) == []
    for unit in (truncated, junk):
        [problem] = json.loads((tmp_path / "store" / "quarantine" / unit / "report.json").read_text())
        assert problem["check"] == "staged_unit_publishable" and "not a readable Parquet file" in problem["detail"]

    missing = {run.run_id for run in runs} - done_run_ids(store)
    assert missing == {run.run_id for group in groups[:2] for run in group}
    todo = [run for run in runs if run.run_id in missing]
    assert run_chunk(store.uri, todo)["status:complete"] == 4
    publish(store)
    published = open_dataset(store.uri).runs(columns=["run_id"])["run_id"].to_pylist()
    assert sorted(published) == sorted(run.run_id for run in runs)  # each run exactly once


def test_a_damaged_runs_file_seen_by_the_planner_is_quarantined_so_the_same_sweep_retrains_it(tmp_path):
    from butter_pipeline.execute import unit_id
    from butter_pipeline.plan import done_run_ids

    store = open_store(tmp_path / "store")
    runs = list(plan_runs(_spec("damaged-runs")))
    run_chunk(store.uri, runs)
    unit = unit_id(runs)
    (tmp_path / "store" / "staging" / unit / "runs.parquet").write_bytes(b"\x00" * 64)
    assert done_run_ids(store) == set()
    assert quarantined_units(store) == [unit] and staged_units(store) == []
    assert run_chunk(store.uri, runs)["status:complete"] == 2  # trained again, not "already staged"


@pytest.mark.integration
@pytest.mark.s3
def test_an_s3_outage_mid_sweep_delays_it_and_loses_nothing(tmp_path, prefect_api_url):
    """The S3 server is stopped for a while once the sweep has staged work, then started again on the same
    ports and data: the workers' staging and the publisher retry with backoff, and the sweep completes with
    every run exactly once."""
    with seaweedfs_process(tmp_path / "weed") as weed:
        env = {**os.environ, **weed.server.env(), "PREFECT_API_URL": prefect_api_url}
        uri = f"s3://{weed.server.bucket}/outage"
        sweep = subprocess.Popen(
            [BUTTER, "run", "smoke", "--store", uri, "--workers", "1"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        with mock.patch.dict(os.environ, weed.server.env()):
            store = open_store(uri)
            deadline = time.monotonic() + 300
            while not store.fs.glob(store.path("staging", "*", "runs.parquet")) and time.monotonic() < deadline:
                assert sweep.poll() is None, sweep.communicate()[1][-3000:]
                time.sleep(0.3)
        weed.stop()
        time.sleep(OUTAGE_SECONDS)
        weed.start()
        out, err = sweep.communicate(timeout=600)
        assert sweep.returncode == 0, err[-3000:]
        assert "published 12 runs" in out and "Traceback" not in err
        assert "retrying in" in err  # the outage was met, and waited out
        with mock.patch.dict(os.environ, weed.server.env()):
            ids = open_dataset(uri).runs(columns=["run_id"])["run_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 12


@pytest.mark.s3
def test_a_long_outage_stops_with_a_clear_error_and_keeps_staged_work(tmp_path, monkeypatch):
    from butter_pipeline.errors import StoreError

    with seaweedfs_process(tmp_path / "weed") as weed:
        for name, value in weed.server.env().items():
            monkeypatch.setenv(name, value)
        store = open_store(f"s3://{weed.server.bucket}/long-outage")
        runs, epochs = synthetic_tables(6, 3, datasets=("adult",), seed=4)
        stage_result(store, "u1", runs, epochs)
        monkeypatch.setenv("BUTTER_STORE_RETRY_SECONDS", "3")
        weed.stop()
        with pytest.raises(StoreError) as raised:
            publish(store)
        message = str(raised.value)
        assert message.startswith(f"store {store.uri}: publishing: the store did not answer for")
        assert "staged work is kept" in message and "\n" not in message
        weed.start()
        store = open_store(store.uri)
        assert staged_units(store) == ["u1"]  # nothing lost
        assert publish(store).runs_added == 6


@pytest.mark.integration
def test_a_worker_killed_mid_sweep_loses_and_duplicates_nothing(tmp_path, prefect_api_url):
    """Two Dask workers, each its own process; once work is staged, the one busy with a chunk is killed
    with SIGKILL. Dask re-runs its chunk on the other worker; the sweep completes, every run exactly once."""
    import signal
    import socket

    from distributed import Client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
    bin_dir = Path(sys.executable).parent
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    cluster = [
        subprocess.Popen(
            [bin_dir / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            env=env,
            **quiet,
        )
    ]
    try:
        for name in ("w1", "w2"):
            cluster.append(
                subprocess.Popen(
                    [bin_dir / "dask", "worker", address, "--name", name, "--nthreads", "1", "--no-nanny"]
                    + ["--host", "127.0.0.1", "--no-dashboard"],
                    env=env,
                    **quiet,
                )
            )
        with Client(address, timeout="30s", set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
            store = tmp_path / "store"
            sweep = subprocess.Popen(
                [BUTTER, "run", "smoke", "--store", str(store), "--dask-address", address],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            deadline = time.monotonic() + 300
            victim = None
            while victim is None and time.monotonic() < deadline:
                assert sweep.poll() is None, sweep.communicate()[1][-3000:]
                staged = list((store / "staging").glob("*/runs.parquet")) if (store / "staging").is_dir() else []
                busy = [worker for worker, keys in client.processing().items() if keys]
                if staged and busy:
                    victim = busy[0]
                time.sleep(0.2)
            assert victim is not None, "no worker was busy once work was staged"
            pid = client.run(os.getpid, workers=[victim])[victim]
            os.kill(pid, signal.SIGKILL)
            out, err = sweep.communicate(timeout=600)
            survivors = len(client.scheduler_info()["workers"])
    finally:
        for proc in reversed(cluster):
            proc.terminate()
        for proc in cluster:
            proc.wait(timeout=30)
    assert survivors == 1
    assert sweep.returncode == 0, err[-3000:]
    assert "published 12 runs" in out
    ids = open_dataset(str(store)).runs(columns=["run_id"])["run_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 12


@pytest.mark.s3
def test_a_reader_with_read_only_credentials_reads_but_cannot_write(tmp_path, s3_server):
    """Two identities on the S3 server (the pipeline's, and a consumer's with Read and List only): the reader
    opens the dataset; its publish, release and direct writes are refused and the tables stay as they were."""
    uri = f"s3://{s3_server.bucket}/read-only-{tmp_path.name}"
    with mock.patch.dict(os.environ, s3_server.env()):
        store = open_store(uri)
        runs, epochs = synthetic_tables(4, 3, datasets=("adult",), seed=6)
        stage_result(store, "u1", runs, epochs)
        publish(store)
        stage_result(store, "u2", *synthetic_tables(2, 3, datasets=("adult",), seed=7))
        before = sorted(store.fs.find(store.root))
    reader_env = {**os.environ, **s3_server.env(reader=True), "BUTTER_STORE_RETRY_SECONDS": "0"}
    with mock.patch.dict(os.environ, reader_env):
        assert open_dataset(uri).runs(columns=["run_id"]).num_rows == 4
        reader = open_store(uri, create=False)
        with pytest.raises(PermissionError):
            reader.fs.pipe_file(reader.path("planted.txt"), b"x")
    for command in (["publish", "--store", uri], ["release", "r1", "--store", uri]):
        result = subprocess.run([BUTTER, *command], env=reader_env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert s3_server.reader_secret not in result.stderr + result.stdout
    with mock.patch.dict(os.environ, s3_server.env()):
        assert sorted(open_store(uri).fs.find(open_store(uri).root)) == before  # nothing written, nothing lost
