"""butter's four deployments, for ``butter serve`` (one process) and, by the same names and schedules,
``prefect.yaml`` (a work pool); a test keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass

from butter_pipeline.flows.sweep import sweep_flow
from butter_pipeline.flows.tables import maintain_flow, publish_flow, summarize_flow
from prefect import Flow
from prefect.deployments.runner import EntrypointType
from prefect.schedules import Cron


@dataclass(frozen=True)
class Deployment:
    name: str
    flow: Flow
    cron: str | None  # UTC; None: started by hand (the UI's form, `prefect deployment run`)
    description: str


DEPLOYMENTS = (
    Deployment("sweep", sweep_flow, None, "Train what a sweep still lacks, publish it and update the summaries."),
    Deployment("publish", publish_flow, "*/10 * * * *", "Commit staged results into the Delta tables."),
    Deployment("summarize", summarize_flow, "0 * * * *", "Recompute the summaries of experiments that changed."),
    Deployment("maintain", maintain_flow, "30 3 * * *", "Compact, checkpoint and vacuum the tables."),
)


def runner_deployments(store: str) -> list:
    """The deployments as Prefect runner deployments, with ``store`` as every flow's default store."""
    out = []
    for d in DEPLOYMENTS:
        out.append(
            d.flow.to_deployment(
                name=d.name,
                description=d.description,
                parameters={"store": store},
                tags=["butter"],
                schedule=Cron(d.cron, timezone="UTC") if d.cron else None,
                # one at a time: a second publisher would only wait for the lock
                concurrency_limit=None if d.name == "sweep" else 1,
                entrypoint_type=EntrypointType.MODULE_PATH,  # wherever the package is installed
            )
        )
    return out
