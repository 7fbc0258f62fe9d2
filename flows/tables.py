"""Flows that keep the published tables: publish staged work, summarize, and maintain (one writer each).

Scheduled as deployments (publish every few minutes, summarize hourly, maintain daily); each takes the
store's publisher lock, so a scheduled run that finds another writer at work fails without touching data
and the next run catches up.
"""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow, get_run_logger

from butter_pipeline import maintain as maintenance
from butter_pipeline import publish as publishing
from butter_pipeline import summarize as summarizing
from butter_pipeline.store import DEFAULT_STORE, open_store


@flow(name="butter-publish")
def publish_flow(store: str = DEFAULT_STORE) -> dict[str, int | None]:
    """Commit every staged unit of a store into its Delta tables.

    Args:
        store: The dataset: a folder or s3://bucket/prefix.
    """
    report = asdict(publishing.publish(open_store(store, create=False)))
    get_run_logger().info("published %(runs_added)s runs in %(commits)s commits", report)
    return report


@flow(name="butter-summarize")
def summarize_flow(store: str = DEFAULT_STORE) -> dict[str, int | None]:
    """Recompute the summaries of the experiments whose runs changed since the last pass.

    Args:
        store: The dataset: a folder or s3://bucket/prefix.
    """
    report = asdict(summarizing.summarize_store(open_store(store, create=False)))
    get_run_logger().info("summarized %(experiments)s experiments (runs version %(runs_version)s)", report)
    return report


@flow(name="butter-maintain")
def maintain_flow(
    store: str = DEFAULT_STORE, zorder: bool = False, retention_hours: int = maintenance.DEFAULT_RETENTION_HOURS
) -> list[dict[str, int | str]]:
    """Compact (or z-order), checkpoint and vacuum the tables; release files are always kept.

    Args:
        store: The dataset: a folder or s3://bucket/prefix.
        zorder: Z-order the files by shape, depth and size instead of compacting them.
        retention_hours: Vacuum files that no version has used for this many hours (a week by default).
    """
    reports = maintenance.maintain(open_store(store, create=False), zorder=zorder, retention_hours=retention_hours)
    return [asdict(r) for r in reports]
