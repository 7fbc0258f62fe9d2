"""The data contract stays exact: README, Arrow schemas and pandera models name the same columns."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from butter_pipeline.schemas import (
    EPOCHS_SCHEMA,
    RUNS_SCHEMA,
    SCHEMA_VERSION,
    SUMMARIES_SCHEMA,
    EpochsTable,
    RunsTable,
)

README = Path(__file__).resolve().parents[1] / "schemas" / "README.md"


def _documented(table: str) -> list[tuple[str, str, bool]]:
    text = README.read_text()
    section = text.split(f"## `{table}`", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z0-9_]+)` \| ([^|]+) \| (yes|no) \|", section, flags=re.M)
    return [(name, kind.strip(), nullable == "yes") for name, kind, nullable in rows]


def _arrow_type(field) -> str:
    text = str(field.type)
    text = text.replace("list<item: ", "list<").replace("timestamp[us, tz=UTC]", "timestamp[us, UTC]")
    return {"double": "float64", "float": "float32"}.get(text, text.replace("double", "float64"))


@pytest.mark.parametrize(
    ("table", "schema", "model"), [("runs", RUNS_SCHEMA, RunsTable), ("epochs", EPOCHS_SCHEMA, EpochsTable)]
)
def test_readme_arrow_and_pandera_agree(table, schema, model):
    documented = _documented(table)
    actual = [(f.name, _arrow_type(f), f.nullable) for f in schema]
    assert documented == actual
    assert list(model.to_schema().columns) == schema.names


def test_readme_documents_every_summaries_column():
    documented = _documented("summaries")
    assert documented == [(f.name, _arrow_type(f), f.nullable) for f in SUMMARIES_SCHEMA]


def test_readme_states_the_schema_version():
    assert f"schema version {SCHEMA_VERSION}" in README.read_text()
