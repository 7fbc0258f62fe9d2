"""Sweep specs: expansion, golden ids, and errors that name the file, the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from butter_pipeline.errors import SpecError
from butter_pipeline.ids import canonical_json
from butter_pipeline.sweep import expand, load_spec, parse_spec, plan_runs, preset_names

GOLDEN = [
    # (grid, repetition) -> canonical config, experiment_id, run_id, seed. These ids are in published data:
    # if this test fails, identities changed and every existing dataset would be re-trained. Don't.
    (
        {"dataset": "529_pollen", "size": 1024, "learning_rate": 0.001, "epochs": 20},
        0,
        '{"batch_size":256,"dataset":"529_pollen","depth":3,"epochs":20,"kernel_regularizer":null,'
        '"label_noise":0.0,"learning_rate":0.001,"momentum":0.0,"optimizer":"adam","shape":"rectangle",'
        '"size":1024,"test_split":0.2}',
        "fa963968605d20f407b53442",
        "96a35f4abf0a50859902ed6b",
        4175762890708245457,
    ),
    (
        {
            "dataset": "mnist",
            "size": 2**20,
            "shape": "rectangle_residual",
            "depth": 8,
            "learning_rate": 1e-5,
            "batch_size": 32,
            "epochs": 300,
            "optimizer": "rmsprop",
            "momentum": 0.9,
            "label_noise": 0.05,
            "kernel_regularizer": {"type": "l2", "strength": 7.8125e-05},
            "test_split": 0.2,
        },
        2,
        '{"batch_size":32,"dataset":"mnist","depth":8,"epochs":300,"kernel_regularizer":{"strength":7.8125e-05,'
        '"type":"l2"},"label_noise":0.05,"learning_rate":1e-05,"momentum":0.9,"optimizer":"rmsprop",'
        '"shape":"rectangle_residual","size":1048576,"test_split":0.2}',
        "5820dc06a0151bb29dd55e84",
        "adf2b409a383bb626e816599",
        7732232102765349628,
    ),
]


@pytest.mark.parametrize(("grid", "repetition", "config", "experiment", "run", "seed"), GOLDEN)
def test_golden_ids(grid, repetition, config, experiment, run, seed):
    spec = parse_spec({"name": "golden", "repetitions": repetition + 1, "grid": grid}, source="golden")
    runs = [r for r in plan_runs(spec) if r.repetition == repetition]
    assert len(runs) == 1
    assert canonical_json(runs[0].experiment.config()) == config
    assert (runs[0].experiment_id, runs[0].run_id, runs[0].seed) == (experiment, run, seed)


def test_ids_ignore_axis_order_spelling_and_sweep_name():
    a = parse_spec(
        {
            "name": "a",
            "repetitions": 1,
            "grid": {"dataset": ["adult", "banana"], "size": [64, 128], "learning_rate": 1e-3},
        },
        source="a",
    )
    b = parse_spec(
        {
            "name": "b",
            "repetitions": 1,
            "grid": {"learning_rate": [0.001], "size": [128, 64], "dataset": ["banana", "adult"]},
        },
        source="b",
    )
    assert {r.run_id for r in plan_runs(a)} == {r.run_id for r in plan_runs(b)}


def test_expansion_is_the_cartesian_product_times_repetitions():
    spec = parse_spec(
        {
            "name": "p",
            "repetitions": 3,
            "grid": {
                "dataset": ["adult", "banana"],
                "size": [64, 128, 256],
                "depth": [2, 3],
                "optimizer": ["adam", "sgd"],
                "momentum": [0.0, 0.9],
            },
        },
        source="p",
    )
    experiments = list(expand(spec))
    # adam takes no momentum, so adam x momentum 0.9 collapses: (1 + 2) optimizer settings
    assert len(experiments) == 2 * 3 * 2 * 3
    runs = list(plan_runs(spec))
    assert len(runs) == len(experiments) * 3
    assert len({r.run_id for r in runs}) == len(runs)
    assert len({r.seed for r in runs}) == len(runs)


def test_presets_load_and_smoke_matches_its_promise():
    assert "smoke" in preset_names()
    smoke = load_spec("smoke")
    runs = list(plan_runs(smoke))
    from butter_pipeline.tasks import load_task

    kinds = {load_task(d).kind for d in smoke.grid[0].dataset}
    assert kinds == {"regression", "binary", "multiclass"}
    assert len(smoke.grid[0].size) == 2 and smoke.grid[0].depth == [3] and smoke.repetitions == 2
    assert len(runs) == 12 and all(r.experiment.epochs == 20 for r in runs)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('name = "x"\n[grid]\ndataset = "nope"\nsize = 10\n', "grid.dataset: unknown dataset 'nope'"),
        ('name = "x"\n[grid]\ndataset = "adult"\nsize = 10\ndepth = 1\n', "grid.depth[0]: Input should be greater"),
        ('name = "x"\n[grid]\ndataset = "adult"\nsize = 10\nshape = "round"\n', "unknown shape 'round'; allowed:"),
        ('name = "x"\n[grid]\ndataset = "adult"\nsize = 10\nlr = 1\n', "grid.lr: unknown key; allowed: dataset"),
        ('name = "x"\n[grid]\nsize = 10\n', "grid.dataset: Field required"),
        ('name = "x"\n[grid]\ndataset = "adult"\nsize = 10\nepochs = 0\n', "grid.epochs[0]: Input should be"),
        ('name = "x"\n[grid]\ndataset = "adult"\nsize = []\n', "grid.size: Value should have at least 1 item"),
        ('name = "x"\nrepetitions = "many"\n[grid]\ndataset = "adult"\nsize = 1\n', "repetitions: Input should"),
        ('name = "x" [grid]', "not valid TOML"),
        (
            'name = "x"\n[grid]\ndataset = "adult"\nsize = 10\nkernel_regularizer = {type = "l2", strenght = 1}\n',
            "grid.kernel_regularizer[0].strenght: unknown key; allowed: type, strength",
        ),
        (
            'name = "x"\n[grid]\ndataset = "adult"\nsize = 10\nmomentum = 0.9\n',
            "grid: optimizer 'adam' takes no momentum",
        ),
        # regression: pydantic's lax mode turned these into 1 epoch and a float learning rate
        (
            'name = "x"\n[grid]\ndataset = "adult"\nsize = 10\nepochs = true\n',
            "grid.epochs[0]: Input should be a valid int",
        ),
        ('name = "x"\n[grid]\ndataset = "adult"\nsize = 10\nlearning_rate = "0.1"\n', "grid.learning_rate[0]: Input"),
        ('name = "x"\n[grid]\ndataset = "adult"\nsize = true\n', "grid.size[0]: Input should be a valid integer"),
        (
            'name = "x"\n[grid]\ndataset = "adult"\nsize = 10\nkernel_regularizer = {type = "l3", strength = 1}\n',
            "grid.kernel_regularizer[0].type: Input should be 'l1' or 'l2'",
        ),
    ],
)
def test_spec_errors_name_file_key_and_rule(tmp_path: Path, text: str, expected: str):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SpecError) as caught:
        load_spec(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


def test_unknown_sweep_name_lists_presets():
    with pytest.raises(SpecError, match="neither a preset .*smoke.* nor a .toml sweep file"):
        load_spec("no-such-sweep")
