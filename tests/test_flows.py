"""The table-keeping flows run as real Prefect flow runs against a real store."""

from __future__ import annotations

import pytest
from butter_pipeline.flows.tables import maintain_flow, publish_flow, summarize_flow

from butter_pipeline.read import open_dataset
from butter_pipeline.stage import stage_result, staged_units
from butter_pipeline.store import open_store
from butter_pipeline.synthetic import synthetic_tables


@pytest.mark.integration
def test_publish_summarize_and_maintain_flows(tmp_path, prefect_api_url):
    store = open_store(tmp_path / "store")
    runs, epochs = synthetic_tables(12, 5, datasets=("529_pollen", "adult"), seed=11)
    assert stage_result(store, "u1", runs, epochs).status == "staged"

    published = publish_flow(store=store.uri)
    assert published["runs_added"] == 12 and staged_units(store) == []
    summarized = summarize_flow(store=store.uri)
    assert summarized["experiments"] == len(set(runs["experiment_id"].to_pylist()))
    maintained = maintain_flow(store=store.uri, retention_hours=0)
    assert {r["table"] for r in maintained} == {"runs", "epochs", "summaries"}

    data = open_dataset(store.uri)
    assert data.runs().num_rows == 12
    assert data.summaries(columns=["epoch"]).num_rows == 5 * summarized["experiments"]
