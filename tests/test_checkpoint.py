"""Long runs survive preemption: a worker killed mid-run resumes from its last checkpoint and records
exactly what an uninterrupted run with the same seeds records."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from butter_pipeline.schemas import METRIC_COLUMNS

from butter_pipeline.checkpoint import CHECKPOINTS
from butter_pipeline.execute import run_chunk
from butter_pipeline.failpoints import FAILPOINT_EXIT_STATUS
from butter_pipeline.publish import publish
from butter_pipeline.read import open_dataset
from butter_pipeline.store import open_store
from butter_pipeline.sweep import load_spec, plan_runs

SWEEP = """\
name = "preempted"
repetitions = {repetitions}

[grid]
dataset = "wine_quality_white"
shape = "trapezoid"
size = 2048
depth = 4
learning_rate = 0.001
batch_size = 64
epochs = 7
"""
TRAIN_IN_A_CHILD = """\
import sys
from butter_pipeline.execute import run_chunk
from butter_pipeline.sweep import load_spec, plan_runs
run_chunk(sys.argv[2], list(plan_runs(load_spec(sys.argv[1]))))
"""


def _epochs(store_uri: str):
    publish(open_store(store_uri, create=False))
    table = open_dataset(store_uri).epochs(columns=["run_id", "epoch", *METRIC_COLUMNS], to="pandas")
    return table.sort_values(["run_id", "epoch"]).reset_index(drop=True)


def _checkpoint_files(store_path: Path) -> list[Path]:
    return sorted((store_path / CHECKPOINTS).glob("*.pt")) if (store_path / CHECKPOINTS).is_dir() else []


@pytest.mark.parametrize("repetitions", [3, 1])
def test_a_run_killed_mid_training_resumes_from_its_checkpoint_with_the_same_records(
    tmp_path, monkeypatch, caplog, repetitions
):
    spec_file = tmp_path / "preempted.toml"
    spec_file.write_text(SWEEP.format(repetitions=repetitions))
    runs = list(plan_runs(load_spec(str(spec_file))))
    monkeypatch.setenv("BUTTER_CHECKPOINT_EVERY", "3")

    # the worker process dies (os._exit, as a SIGKILL would leave it) right after its first checkpoint
    resumed = tmp_path / "resumed"
    child = subprocess.run(
        [sys.executable, "-c", TRAIN_IN_A_CHILD, str(spec_file), str(resumed)],
        env={**os.environ, "BUTTER_FAILPOINT": "train:checkpoint-saved"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == FAILPOINT_EXIT_STATUS, child.stderr[-2000:]
    [saved] = _checkpoint_files(resumed)
    state = torch.load(saved, weights_only=True)  # tensors and plain numbers only: no pickled code
    assert state["epoch"] == 3 and len(state["generators"]) == repetitions
    assert not (resumed / "staging").exists() or not list((resumed / "staging").glob("*/runs.parquet"))

    # the next attempt (Dask re-runs the task elsewhere) picks the checkpoint up
    with caplog.at_level(logging.INFO, logger="butter_pipeline.vtrain"):
        counts = run_chunk(str(resumed), runs)
    assert counts["status:complete"] == repetitions
    assert any("from epoch 3" in record.getMessage() for record in caplog.records)
    assert _checkpoint_files(resumed) == []  # removed once the runs are trained

    uninterrupted = tmp_path / "uninterrupted"
    run_chunk(str(uninterrupted), runs)
    after, before = _epochs(str(resumed)), _epochs(str(uninterrupted))
    assert len(after) == repetitions * 7
    for column in METRIC_COLUMNS:
        assert np.array_equal(after[column].to_numpy(), before[column].to_numpy(), equal_nan=True), column


def test_an_unreadable_checkpoint_is_ignored_and_training_starts_afresh(tmp_path, monkeypatch):
    spec_file = tmp_path / "preempted.toml"
    spec_file.write_text(SWEEP.format(repetitions=2))
    runs = list(plan_runs(load_spec(str(spec_file))))
    monkeypatch.setenv("BUTTER_CHECKPOINT_EVERY", "3")
    from butter_pipeline.checkpoint import checkpoint_key

    store = tmp_path / "store"
    broken = store / CHECKPOINTS / f"{checkpoint_key([r.run_id for r in runs])}.pt"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"PK\x03\x04 truncated")
    assert run_chunk(str(store), runs)["status:complete"] == 2
    reference = tmp_path / "reference"
    monkeypatch.setenv("BUTTER_CHECKPOINT_EVERY", "0")
    run_chunk(str(reference), runs)
    a, b = _epochs(str(store)), _epochs(str(reference))
    assert np.array_equal(a["test_loss"].to_numpy(), b["test_loss"].to_numpy())
    assert _checkpoint_files(store) == []


def test_checkpoint_interval_comes_from_the_environment(monkeypatch):
    from butter_pipeline.checkpoint import every_epochs
    from butter_pipeline.errors import ButterError

    monkeypatch.setenv("BUTTER_CHECKPOINT_EVERY", "25")
    assert every_epochs() == 25
    monkeypatch.setenv("BUTTER_CHECKPOINT_EVERY", "-1")
    with pytest.raises(ButterError, match="BUTTER_CHECKPOINT_EVERY='-1'"):
        every_epochs()
