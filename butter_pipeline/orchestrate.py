"""The orchestration edge: the one library module that imports Prefect (and only when called).

It gives the flow a Prefect API (the configured server, or one temporary local server shared with the
Dask workers), picks the Dask cluster (a LocalCluster, or an existing scheduler by address) and runs the
sweep flow.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

from butter_pipeline.errors import ClusterError

PREFECT_DEFAULTS = {
    # Prefect's own telemetry reaches for the internet; the 20 s default start-up timeout is too short
    # for a fresh database on a 2-core machine.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "DASK_DISTRIBUTED__LOGGING__DISTRIBUTED": "error",
}


def apply_prefect_defaults(*, quiet: bool) -> None:
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if quiet:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """Yield the Prefect API URL to use, starting a temporary local server when none is configured.

    Every Dask worker would otherwise start its own temporary server (tens of seconds each), so the URL
    goes into the environment before the cluster's processes are spawned.
    """
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        yield configured
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    server.start(timeout=int(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def check_scheduler(address: str, *, timeout_s: float = 10.0) -> None:
    """Fail with one clear line when no Dask scheduler answers at ``address``."""
    from distributed import Client
    from distributed.comm import parse_address
    from distributed.comm.addressing import parse_host_port

    try:
        _, location = parse_address(address)
        parse_host_port(location)
    except (ValueError, TypeError) as exc:
        raise ClusterError(f"dask scheduler {address!r}: not an address like tcp://host:8786 ({exc})") from None
    try:
        client = Client(address, timeout=f"{timeout_s}s", set_as_default=False)
    except Exception as exc:  # distributed raises OSError, TimeoutError or ValueError for bad addresses
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ClusterError(f"dask scheduler {address!r}: cannot connect within {timeout_s:.0f} s ({reason})") from None
    client.close()


@dataclass(frozen=True)
class ClusterWorkers:
    """Addresses of a Dask cluster's workers, split by whether they declare a ``GPU`` resource."""

    gpu: tuple[str, ...] = ()
    cpu: tuple[str, ...] = ()


def cluster_workers(address: str, *, timeout_s: float = 10.0) -> ClusterWorkers:
    """Ask the scheduler at ``address`` which workers it has and which of them declare ``GPU``."""
    from distributed import Client

    check_scheduler(address, timeout_s=timeout_s)
    with Client(address, timeout=f"{timeout_s}s", set_as_default=False) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
    gpu = sorted(a for a, info in workers.items() if info.get("resources", {}).get("GPU", 0) > 0)
    cpu = sorted(a for a in workers if a not in gpu)
    return ClusterWorkers(tuple(gpu), tuple(cpu))


def run_sweep_flow(
    *, sweep: str, store: str, workers: int | None, dask_address: str | None, max_runs: int | None
) -> dict[str, object]:
    """Run the sweep flow to completion and return its summary."""
    from butter_pipeline.flows.sweep import sweep_flow

    with prefect_api():
        logging.getLogger("distributed").setLevel(logging.ERROR)
        return sweep_flow(sweep=sweep, store=store, max_runs=max_runs, dask_address=dask_address, workers=workers)


def serve_deployments(store: str) -> None:
    """Serve butter's deployments from this process until interrupted, on the configured Prefect server
    (or a temporary one, whose UI address is printed)."""
    from prefect import serve

    from butter_pipeline.flows.deployments import runner_deployments

    with prefect_api() as url:
        print(f"serving butter's deployments on {url.removesuffix('/api')} (Ctrl-C stops)", flush=True)
        serve(*runner_deployments(store), print_starting_message=False)
