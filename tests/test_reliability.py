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
