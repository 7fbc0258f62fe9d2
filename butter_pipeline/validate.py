"""Check a result's tables against the data contract before anything is written for publishing.

The pandera models in ``schemas`` check each table; the cross-table rules below check what neither table
can see alone (epochs belong to known runs and repeat their attributes; non-finite metrics appear only in
diverged runs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandera.pandas as pa
import pyarrow

from butter_pipeline.schemas import (
    EPOCHS_SCHEMA,
    METRIC_COLUMNS,
    RUN_KEYS_IN_EPOCHS,
    RUNS_SCHEMA,
    EpochsTable,
    RunsTable,
    frame_for_validation,
)


@dataclass(frozen=True)
class Problem:
    table: str
    column: str | None
    check: str
    detail: str


def _pandera_problems(table_name: str, model: type[pa.DataFrameModel], table: pyarrow.Table) -> list[Problem]:
    try:
        model.validate(frame_for_validation(table), lazy=True)
    except pa.errors.SchemaErrors as exc:
        cases = exc.failure_cases.head(50)
        return [
            Problem(table_name, None if c is None else str(c), str(check), f"failure case {case!r}")
            for c, check, case in zip(cases["column"], cases["check"], cases["failure_case"], strict=True)
        ]
    return []


def find_problems(runs: pyarrow.Table, epochs: pyarrow.Table) -> list[Problem]:
    """Every way ``runs`` and ``epochs`` break the contract; empty when they keep it."""
    problems: list[Problem] = []
    for name, table, schema in (("runs", runs, RUNS_SCHEMA), ("epochs", epochs, EPOCHS_SCHEMA)):
        if not table.schema.equals(schema, check_metadata=False):
            problems.append(Problem(name, None, "arrow_schema", f"schema is {table.schema}, expected {schema}"))
    if problems:
        return problems
    problems += _pandera_problems("runs", RunsTable, runs)
    problems += _pandera_problems("epochs", EpochsTable, epochs)

    run_ids = set(runs.column("run_id").to_pylist())
    stray = set(epochs.column("run_id").to_pylist()) - run_ids
    if stray:
        problems.append(Problem("epochs", "run_id", "run_in_runs", f"epochs for unknown runs {sorted(stray)[:5]}"))
    if epochs.num_rows and not stray:
        # The run attributes copied into epochs (for pruning and summaries) must be the run's own.
        keys = ["run_id", *RUN_KEYS_IN_EPOCHS]
        distinct = epochs.select(keys).group_by(keys).aggregate([])
        joined = distinct.join(runs.select(keys), keys=keys, join_type="left anti")
        if joined.num_rows:
            problems.append(
                Problem(
                    "epochs",
                    ",".join(RUN_KEYS_IN_EPOCHS),
                    "matches_runs",
                    f"epochs disagree with their run's attributes for runs {sorted(joined['run_id'].to_pylist())[:5]}",
                )
            )
    if epochs.num_rows:
        # NaN and infinity are data only where training diverged (a null reads as NaN here: never allowed
        # outside diverged runs either)
        metrics = np.column_stack([epochs.column(c).to_numpy(zero_copy_only=False) for c in METRIC_COLUMNS])
        bad_rows = ~np.isfinite(metrics)
        bad_runs = set(np.asarray(epochs.column("run_id").to_pylist())[bad_rows.any(axis=1)])
        diverged = {
            r for r, s in zip(runs["run_id"].to_pylist(), runs["status"].to_pylist(), strict=True) if s == "diverged"
        }
        undeclared = bad_runs - diverged
        if undeclared:
            problems.append(
                Problem(
                    "epochs",
                    "metrics",
                    "finite_unless_diverged",
                    f"non-finite metric values in runs not marked diverged: {sorted(undeclared)[:5]}",
                )
            )
    return problems


def report_json(problems: list[Problem]) -> str:
    return json.dumps([p.__dict__ for p in problems], indent=2, default=str)
