"""Staging, quarantine and exactly-once publishing into Delta tables, on a local folder and on S3."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from butter_pipeline import publish as publishing
from butter_pipeline.plan import done_run_ids
from butter_pipeline.read import open_dataset
from butter_pipeline.record import epochs_table, runs_table
from butter_pipeline.stage import quarantined_units, stage_result, staged_units
from butter_pipeline.store import open_store
from butter_pipeline.sweep import parse_spec, plan_runs
from butter_pipeline.train import train_run


@pytest.fixture(scope="module")
def results():
    spec = parse_spec(
        {"name": "pub", "repetitions": 3, "grid": {"dataset": "529_pollen", "size": 256, "epochs": 4}}, source="test"
    )
    return [train_run(run) for run in plan_runs(spec)]


def _stage_all(store, results):
    return [stage_result(store, r.run.run_id, runs_table([r]), epochs_table([r])).status for r in results]


def _counts(store):
    data = open_dataset(store.uri)
    return data.runs().num_rows, data.epochs().num_rows


def test_publish_is_exactly_once(tmp_path, results):
    store = open_store(tmp_path / "store")
    assert _stage_all(store, results) == ["staged"] * 3
    assert _stage_all(store, results) == ["already-staged"] * 3  # a re-executed task writes nothing
    report = publishing.publish(store)
    assert (report.runs_added, report.epochs_added, report.commits) == (3, 12, 2)
    assert _counts(store) == (3, 12) and staged_units(store) == []
    # publishing again, and staging the same runs again, adds nothing
    assert publishing.publish(store).runs_added == 0
    _stage_all(store, results)
    again = publishing.publish(store)
    assert (again.runs_added, again.epochs_added) == (0, 0)
    assert _counts(store) == (3, 12)
    assert done_run_ids(store) == {r.run.run_id for r in results}


def test_publisher_killed_between_commits_finishes_without_duplicates(tmp_path, results, monkeypatch):
    """Regression: a publisher dying after the epochs commit must not add those epochs twice."""
    store = open_store(tmp_path / "store")
    _stage_all(store, results)
    real_append = publishing.append

    def die_before_runs(table, data, name, *, transaction):
        if name == "runs":
            raise KeyboardInterrupt("publisher killed")
        real_append(table, data, name, transaction=transaction)

    monkeypatch.setattr(publishing, "append", die_before_runs)
    with pytest.raises(KeyboardInterrupt):
        publishing.publish(store)
    monkeypatch.setattr(publishing, "append", real_append)
    assert store.fs.exists(store.path("_publish", "pending.json"))
    report = publishing.publish(store)
    assert (report.runs_added, report.commits) == (3, 1)  # only the missing runs commit was made
    assert _counts(store) == (3, 12)
    runs = DeltaTable(store.table_uri("runs"))
    assert runs.transaction_version(publishing.APP_ID) == 1


def test_result_breaking_the_schema_is_quarantined_not_published(tmp_path, results):
    store = open_store(tmp_path / "store")
    good, bad = results[0], results[1]
    epochs = epochs_table([bad])
    # a "complete" run with a NaN loss and an accuracy above 1 breaks the contract twice
    loss = epochs.column("test_loss").to_numpy().copy()
    loss[2] = np.nan
    accuracy = np.full(epochs.num_rows, 1.5, dtype=np.float32)
    epochs = epochs.set_column(
        epochs.schema.get_field_index("test_loss"), epochs.schema.field("test_loss"), pyarrow.array(loss)
    )
    epochs = epochs.set_column(
        epochs.schema.get_field_index("test_accuracy"), epochs.schema.field("test_accuracy"), pyarrow.array(accuracy)
    )
    outcome = stage_result(store, bad.run.run_id, runs_table([bad]), epochs)
    assert outcome.status == "quarantined" and outcome.problems >= 2
    stage_result(store, good.run.run_id, runs_table([good]), epochs_table([good]))
    publishing.publish(store)
    runs = open_dataset(store.uri).runs()
    assert runs.column("run_id").to_pylist() == [good.run.run_id]
    assert quarantined_units(store) == [bad.run.run_id]
    report = json.loads(store.fs.cat_file(store.path("quarantine", bad.run.run_id, "report.json")))
    checks = {p["check"] for p in report}
    assert "finite_unless_diverged" in checks and any("accuracy" in c for c in checks)


def test_wrong_arrow_type_is_quarantined(tmp_path, results):
    store = open_store(tmp_path / "store")
    r = results[2]
    epochs = epochs_table([r])
    epochs = epochs.set_column(3, pyarrow.field("epoch", pyarrow.int64()), pc.cast(epochs["epoch"], pyarrow.int64()))
    assert stage_result(store, r.run.run_id, runs_table([r]), epochs).status == "quarantined"


@pytest.mark.s3
def test_publish_on_s3_is_exactly_once(s3_env, results):
    store = open_store(f"s3://{s3_env.bucket}/publish-test")
    _stage_all(store, results)
    first = publishing.publish(store)
    assert (first.runs_added, first.epochs_added) == (3, 12)
    _stage_all(store, results)
    assert publishing.publish(store).runs_added == 0
    assert _counts(store) == (3, 12)


def test_a_trained_group_is_one_unit_and_a_bad_member_is_quarantined_alone(tmp_path, results, monkeypatch):
    from butter_pipeline import execute
    from butter_pipeline.stage import staged_run_count, units_in
    from butter_pipeline.validate import Problem

    store = open_store(tmp_path / "store")
    unit = execute.unit_id([r.run for r in results])
    outcomes = execute.stage_results(store, unit, results)
    assert [(o.status, o.runs) for o in outcomes] == [("staged", 3)]
    assert units_in(store) == {("staging", unit)} and staged_run_count(store, "staging", unit) == 3

    other = open_store(tmp_path / "other")
    real = execute.find_problems

    def second_run_is_bad(runs, epochs):  # the contract rejects whatever holds the second run
        if results[1].run.run_id in runs.column("run_id").to_pylist():
            return [Problem("runs", "run_id", "injected", "this run is declared bad by the test")]
        return real(runs, epochs)

    monkeypatch.setattr(execute, "find_problems", second_run_is_bad)
    monkeypatch.setattr("butter_pipeline.stage.find_problems", second_run_is_bad)
    outcomes = execute.stage_results(other, unit, results)
    assert sorted((o.status, o.runs) for o in outcomes) == [("quarantined", 1), ("staged", 2)]
    assert quarantined_units(other) == [results[1].run.run_id]
    assert publishing.publish(other).runs_added == 2


def _publish_in_child(uri: str, env: dict[str, str]) -> str:
    """Run one publisher in a fresh (spawned) process; returns what happened to it."""
    import os

    from butter_pipeline.errors import PublishConflict

    os.environ.update(env)
    try:
        report = publishing.publish(open_store(uri))
    except PublishConflict:
        return "conflict"
    return f"published {report.runs_added}"


@pytest.mark.s3
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_publishers_at_once_neither_duplicate_nor_lose(where, tmp_path, results, s3_env):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    uri = str(tmp_path / "store") if where == "local" else f"s3://{s3_env.bucket}/race-{tmp_path.name}"
    store = open_store(uri)
    _stage_all(store, results)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        outcomes = list(pool.map(_publish_in_child, [store.uri] * 2, [s3_env.env()] * 2))
    assert "published 3" in outcomes and set(outcomes) <= {"published 3", "published 0", "conflict"}
    publishing.publish(store)  # whatever the race left staged
    assert _counts(store) == (3, 12)
    assert not store.fs.exists(store.path(*publishing.LOCK))


@pytest.mark.s3
def test_a_held_lock_refuses_a_second_publisher_and_a_stale_one_is_broken(tmp_path, results, s3_env):
    from butter_pipeline.errors import PublishConflict

    store = open_store(f"s3://{s3_env.bucket}/lock-{tmp_path.name}")
    _stage_all(store, results)
    with publishing.publisher_lock(store):
        with pytest.raises(PublishConflict, match="another publisher .* has held the lock"):
            publishing.publish(store)
        assert publishing.open_table(store, "runs") is None  # the refused publisher changed nothing
    lock = store.path(*publishing.LOCK)
    now = time.time()
    store.fs.pipe_file(lock, json.dumps({"owner": "other-host:1:x", "since": now, "renewed": now}).encode())
    with pytest.raises(PublishConflict):  # a fresh lease of another machine is respected
        publishing.publish(store)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = f"{socket.gethostname()}:{dead.stdout.strip()}:x"
    store.fs.pipe_file(lock, json.dumps({"owner": owner, "since": now, "renewed": now}).encode())
    assert publishing.publish(store).runs_added == 3  # its owner is a dead process here: broken at once
    store.fs.pipe_file(lock, json.dumps({"owner": "other-host:1:x", "since": 0, "renewed": 0}).encode())
    _stage_all(store, results)
    assert publishing.publish(store).runs_added == 0  # a lease not renewed for long is broken
