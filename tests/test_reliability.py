"""Faults survived and nothing lost: diverged training as data, corrupted staging, killed workers, an S3
outage in the middle of a sweep."""

from __future__ import annotations

import numpy as np
import pyarrow
import pyarrow.compute as pc
from butter_pipeline.schemas import METRIC_COLUMNS

from butter_pipeline.execute import run_chunk
from butter_pipeline.publish import publish
from butter_pipeline.read import open_dataset
from butter_pipeline.stage import quarantined_units, stage_result, staged_units
from butter_pipeline.store import open_store
from butter_pipeline.summarize import update_summaries
from butter_pipeline.sweep import parse_spec, plan_runs
from butter_pipeline.synthetic import synthetic_tables


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
        assert problem["check"] == "staged_unit_readable" and "not a readable Parquet file" in problem["detail"]

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
