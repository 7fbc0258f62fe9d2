"""The vectorized trainer against the reference one-run trainer, and its memory guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from butter_pipeline import vtrain
from butter_pipeline.nets import SHAPES
from butter_pipeline.sweep import parse_spec, plan_runs
from butter_pipeline.train import train_run
from butter_pipeline.vtrain import group_runs, train_group, train_runs


def _runs(repetitions: int, **grid):
    return list(plan_runs(parse_spec({"name": "v", "repetitions": repetitions, "grid": grid}, source="test")))


def _assert_same(alone, stacked, rel=1e-4):
    assert alone.run.run_id == stacked.run.run_id and alone.status == stacked.status
    assert alone.layout == stacked.layout and alone.train_rows == stacked.train_rows
    for name, values in alone.history.items():
        # accuracy counts rows: a float32 rounding may flip one row's prediction at the decision boundary
        rows = alone.train_rows if name.startswith("train") else alone.test_rows
        atol = 2.0 / rows if name.endswith("accuracy") else 1e-6
        np.testing.assert_allclose(stacked.history[name], values, rtol=rel, atol=atol, err_msg=name)


@pytest.mark.parametrize("shape", SHAPES)
def test_a_member_of_a_stacked_model_matches_the_run_trained_alone(shape):
    runs = _runs(3, dataset="wine_quality_white", shape=shape, size=2048, depth=4, epochs=5, learning_rate=1e-3)
    stacked = train_group(runs)
    assert [r.vector_width for r in stacked] == [3, 3, 3]
    for run, result in zip(runs, stacked, strict=True):
        _assert_same(train_run(run), result)


@pytest.mark.parametrize(
    "grid",
    [
        {"dataset": "529_pollen", "label_noise": 0.1, "kernel_regularizer": {"type": "l2", "strength": 1e-3}},
        {"dataset": "adult", "optimizer": "sgd", "momentum": 0.9, "learning_rate": 1e-3, "batch_size": 512},
        {"dataset": "connect_4", "optimizer": "rmsprop", "kernel_regularizer": {"type": "l1", "strength": 1e-4}},
        {"dataset": "splice", "optimizer": "rmsprop", "momentum": 0.9, "label_noise": 0.2},
    ],
)
def test_every_kind_optimizer_penalty_and_noise_matches_alone(grid):
    runs = _runs(2, size=1024, epochs=5, **{"learning_rate": 1e-4, **grid})
    for run, result in zip(runs, train_group(runs), strict=True):
        _assert_same(train_run(run), result)


def test_members_with_different_learning_rates_noise_and_penalties_share_a_model():
    spec = parse_spec(
        {
            "name": "mix",
            "repetitions": 1,
            "grid": {
                "dataset": "banana",
                "size": 512,
                "epochs": 4,
                "learning_rate": [1e-2, 1e-3],
                "label_noise": [0.0, 0.1],
                "kernel_regularizer": ["none", {"type": "l2", "strength": 1e-3}],
            },
        },
        source="test",
    )
    runs = list(plan_runs(spec))
    (group,) = group_runs(runs)
    assert len(group) == 8
    for run, result in zip(runs, train_group(runs), strict=True):
        _assert_same(train_run(run), result)


def test_results_do_not_depend_on_batch_mates():
    runs = _runs(6, dataset="nursery", size=1024, epochs=3, learning_rate=1e-3)
    wide = train_group(runs)
    narrow = train_group(runs[3:5])
    other = train_group([runs[4], *_runs(2, dataset="nursery", size=1024, epochs=3, learning_rate=1e-2)])
    for result in (narrow[1], other[0]):
        assert result.run.seed == wide[4].run.seed
        _assert_same(wide[4], result, rel=1e-5)


def test_diverging_member_does_not_disturb_the_others():
    spec = parse_spec(
        {
            "name": "div",
            "repetitions": 1,
            "grid": {
                "dataset": "wine_quality_white",
                "size": 1024,
                "epochs": 4,
                "optimizer": "sgd",
                "learning_rate": [1e12, 1e-2],
            },
        },
        source="test",
    )
    runs = list(plan_runs(spec))
    stacked = train_group(runs)
    assert [r.status for r in stacked] == ["diverged", "complete"]
    _assert_same(train_run(runs[0]), stacked[0])
    _assert_same(train_run(runs[1]), stacked[1])


def test_memory_guard_splits_groups_to_fit_the_budget(monkeypatch):
    runs = _runs(6, dataset="529_pollen", size=1024, epochs=2)
    monkeypatch.setenv("BUTTER_MEMORY_BUDGET", "1")  # nothing fits: one run at a time
    assert [r.vector_width for r in train_runs(runs)] == [1] * 6
    monkeypatch.setenv("BUTTER_MEMORY_BUDGET", str(10**12))
    assert [r.vector_width for r in train_runs(runs)] == [6] * 6


def test_out_of_memory_halves_the_group_then_records_a_failure(monkeypatch):
    runs = _runs(4, dataset="529_pollen", size=1024, epochs=2)
    real = vtrain.train_group

    def small_memory(group, task=None, **options):
        if len(group) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(group, task, **options)

    monkeypatch.setattr(vtrain, "train_group", small_memory)
    assert [r.vector_width for r in train_runs(runs)] == [2, 2, 2, 2]

    def no_memory(group, task=None, **options):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(vtrain, "train_group", no_memory)
    results = train_runs(runs)
    assert [r.status for r in results] == ["failed"] * 4
    assert all("out of memory" in r.error for r in results)
