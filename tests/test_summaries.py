"""Summaries equal a straightforward pandas computation, on a local store and on SeaweedFS, incrementally."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow
import pyarrow.compute as pc
import pytest
from butter_pipeline.schemas import SUMMARIES_SCHEMA

from butter_pipeline.publish import publish, publisher_lock
from butter_pipeline.read import open_dataset
from butter_pipeline.stage import stage_result
from butter_pipeline.store import open_store
from butter_pipeline.summarize import summarize, update_summaries
from butter_pipeline.synthetic import synthetic_tables


def _percentile_cont(values: list[float], p: float) -> float:
    """PostgreSQL's percentile_cont over values sorted with NaN last, written out plainly."""
    ordered = sorted(v for v in values if math.isfinite(v)) + [math.nan] * sum(not math.isfinite(v) for v in values)
    position = p * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _expected(runs: pyarrow.Table, epochs: pyarrow.Table) -> pd.DataFrame:
    trained = runs.to_pandas()
    trained = trained[trained["status"].isin(["complete", "diverged"])]
    frame = epochs.to_pandas()
    frame = frame[frame["run_id"].isin(trained["run_id"])]
    rows = []
    for (experiment, epoch), group in frame.groupby(["experiment_id", "epoch"]):
        row = {"experiment_id": experiment, "epoch": epoch, "num": len(group)}
        for side in ("train", "test"):
            for metric in ("loss", "accuracy", "mean_squared_error", "kullback_leibler_divergence"):
                values = group[f"{side}_{metric}"].astype(float).tolist()
                finite = [v for v in values if math.isfinite(v)]
                name = f"{side}_{metric}"
                if metric == "loss":
                    row[f"{name}_num_finite"] = len(finite)
                    row[f"{name}_min"] = min(finite) if finite else None
                    row[f"{name}_max"] = max(finite) if finite else None
                row[f"{name}_mean"] = float(np.mean(finite)) if finite else None
                row[f"{name}_std"] = float(np.std(finite, ddof=1)) if len(finite) > 1 else None
                for stat, p in (("q1", 0.25), ("median", 0.5), ("q3", 0.75)):
                    row[f"{name}_{stat}"] = _percentile_cont(values, p)
        rows.append(row)
    expected = pd.DataFrame(rows)
    best = []
    for _, group in frame.groupby("run_id"):
        loss = group[np.isfinite(group["test_loss"])].sort_values(["test_loss", "epoch"])
        accuracy = group[np.isfinite(group["test_accuracy"])].sort_values(
            ["test_accuracy", "epoch"], ascending=[False, True]
        )
        best.append(
            {
                "experiment_id": group["experiment_id"].iloc[0],
                "loss_epoch": loss["epoch"].iloc[0] if len(loss) else None,
                "loss_value": loss["test_loss"].iloc[0] if len(loss) else None,
                "accuracy_epoch": accuracy["epoch"].iloc[0] if len(accuracy) else None,
            }
        )
    per_run = pd.DataFrame(best)
    aggregated = per_run.groupby("experiment_id").agg(
        test_loss_min_epoch_min=("loss_epoch", "min"),
        test_loss_min_epoch_median=("loss_epoch", "median"),
        test_loss_min_value_mean=("loss_value", "mean"),
        test_loss_min_value_max=("loss_value", "max"),
        test_accuracy_max_epoch_max=("accuracy_epoch", "max"),
    )
    num_runs = trained.groupby("experiment_id").size().rename("num_runs")
    return expected.join(aggregated, on="experiment_id").join(num_runs, on="experiment_id")


def _assert_matches(actual: pyarrow.Table, runs: pyarrow.Table, epochs: pyarrow.Table) -> None:
    expected = _expected(runs, epochs).sort_values(["experiment_id", "epoch"]).reset_index(drop=True)
    got = actual.to_pandas().sort_values(["experiment_id", "epoch"]).reset_index(drop=True)
    assert len(got) == len(expected) > 0
    assert (got["experiment_id"] == expected["experiment_id"]).all() and (got["epoch"] == expected["epoch"]).all()
    for column in expected.columns.drop(["experiment_id", "epoch"]):
        want = expected[column].astype(float).to_numpy()
        have = got[column].astype(float).to_numpy()
        np.testing.assert_allclose(have, want, rtol=2e-6, atol=1e-7, equal_nan=True, err_msg=column)


@pytest.fixture(scope="module")
def tables():
    # 6 experiments x 5 repetitions x 12 epochs; a quarter of the runs diverge part-way
    return synthetic_tables(30, 12, repetitions=5, datasets=("529_pollen", "mnist"), diverged_fraction=0.25, seed=3)


def test_summarize_matches_pandas(tables):
    runs, epochs = tables
    assert runs["status"].to_pylist().count("diverged") > 0  # the NaN-last ordering is exercised
    summary = summarize(runs, epochs, runs_version=7)
    assert summary.schema.equals(SUMMARIES_SCHEMA)
    _assert_matches(summary, runs, epochs)
    assert set(summary["runs_version"].to_pylist()) == {7}


def test_quartiles_put_non_finite_values_last():
    runs, epochs = synthetic_tables(4, 3, repetitions=4, datasets=("529_pollen",), seed=1)
    loss = np.array(epochs["test_loss"].to_numpy(), dtype=np.float32)
    loss[epochs["run_id"].to_numpy(zero_copy_only=False) == runs["run_id"][0].as_py()] = np.inf
    epochs = epochs.set_column(epochs.schema.get_field_index("test_loss"), "test_loss", pyarrow.array(loss))
    summary = summarize(runs, epochs, 0).to_pandas()
    # 4 runs, one infinite: q3 sits between the 3rd finite value and the non-finite one -> NaN; median is finite
    assert summary["test_loss_q3"].isna().all() and summary["test_loss_median"].notna().all()
    assert (summary["test_loss_num_finite"] == 3).all()


def _stage(store, runs, epochs, unit_size=5):
    ids = runs["run_id"].to_pylist()
    for start in range(0, len(ids), unit_size):
        chosen = pyarrow.array(ids[start : start + unit_size])
        stage_result(
            store,
            f"u{start:05d}",
            runs.filter(pc.is_in(runs["run_id"], value_set=chosen)),
            epochs.filter(pc.is_in(epochs["run_id"], value_set=chosen)),
        )


def _incremental(store, tables):
    runs, epochs = tables
    half = pyarrow.array(runs["run_id"].to_pylist()[:17])  # the cut splits an experiment's repetitions
    first = runs.filter(pc.is_in(runs["run_id"], value_set=half))
    _stage(store, first, epochs.filter(pc.is_in(epochs["run_id"], value_set=half)))
    publish(store)
    with publisher_lock(store):
        report = update_summaries(store)
    assert report.experiments == len(set(first["experiment_id"].to_pylist()))
    assert report.commits == 1  # every changed slice lands in one replace commit
    stored = open_dataset(store.uri).summaries()
    _assert_matches(stored, first, epochs.filter(pc.is_in(epochs["run_id"], value_set=half)))

    _stage(store, runs, epochs)  # the rest lands (the first half again too: published once)
    publish(store)
    with publisher_lock(store):
        again = update_summaries(store)
    changed = set(runs["experiment_id"].to_pylist()[16:])  # experiments with a run after the cut
    assert again.experiments == len(changed)  # only those were recomputed
    stored = open_dataset(store.uri).summaries()
    _assert_matches(stored, runs, epochs)
    with publisher_lock(store):
        assert update_summaries(store).experiments == 0  # nothing changed since


def test_summaries_are_incremental_on_a_local_store(tmp_path, tables):
    _incremental(open_store(tmp_path / "store"), tables)


@pytest.mark.s3
def test_summaries_are_incremental_on_s3(s3_env, tables):
    _incremental(open_store(f"s3://{s3_env.bucket}/summaries-test"), tables)
