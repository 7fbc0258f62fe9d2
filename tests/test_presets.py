"""BUTTER's eight sweeps as presets: exact grids, and sweep membership by BUTTER's predicates."""

from __future__ import annotations

import pytest

from butter_pipeline.membership import PREDICATES, butter_sweeps_of
from butter_pipeline.sweep import expand, load_spec, parse_spec, preset_names

CORE_SIZES = 20  # 2^5 .. 2^24
# preset -> (experiments, repetitions): products of the grids in reference butter.md §5
EXPECTED = {
    "primary": (13 * 8 * 13 * 21, 30),
    "300_epoch": (7 * 4 * 13 * 3, 10),
    "30k_epoch": (7 * 4 * 12 * 14, 10),
    "learning_rate": (7 * 4 * 13 * CORE_SIZES * 4, 20),
    "label_noise": (7 * 4 * 13 * CORE_SIZES * (5 + 2), 30),
    "batch_size": (9 * 9 * CORE_SIZES * 6, 30),
    "regularization": (9 * 9 * CORE_SIZES * 27, 30),
    "optimizer": (13 * 5 * CORE_SIZES * 16 * (1 + 4), 20),
}


def test_all_eight_butter_sweeps_ship_as_presets():
    assert set(EXPECTED) <= set(preset_names())
    assert set(EXPECTED) == set(PREDICATES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_grid_sizes_and_membership(name):
    spec = load_spec(name)
    experiments = list(expand(spec))
    assert (len(experiments), spec.repetitions) == EXPECTED[name]
    # every experiment of a BUTTER preset satisfies that sweep's membership predicate
    outside = [e for e in experiments if name not in butter_sweeps_of(e)]
    assert outside == []


def test_a_core_primary_point_belongs_to_every_sweep_that_admits_it():
    spec = parse_spec(
        {"name": "core", "repetitions": 1, "grid": {"dataset": "mnist", "size": 4096, "depth": 3, "epochs": 3000}},
        source="t",
    )
    (experiment,) = list(expand(spec))
    assert butter_sweeps_of(experiment) == [
        "primary",
        "learning_rate",
        "label_noise",
        "batch_size",
        "regularization",
        "optimizer",
    ]


def test_membership_rejects_points_outside_every_sweep():
    spec = parse_spec(
        {"name": "odd", "repetitions": 1, "grid": {"dataset": "splice", "size": 100, "depth": 6, "epochs": 77}},
        source="t",
    )
    (experiment,) = list(expand(spec))
    assert butter_sweeps_of(experiment) == []


def test_runs_record_their_sweeps():
    from butter_pipeline.record import sweeps_of
    from butter_pipeline.sweep import plan_runs

    spec = parse_spec(
        {
            "name": "mine",
            "repetitions": 1,
            "grid": {"dataset": "adult", "size": 4096, "depth": 3, "batch_size": 32, "epochs": 3000},
        },
        source="t",
    )
    (run,) = list(plan_runs(spec))
    assert sweeps_of(run) == ["batch_size", "optimizer", "mine"]
