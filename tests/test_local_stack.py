"""infra/local for real: a Prefect server, a SeaweedFS S3 server, a Dask scheduler with CPU workers and a
Prefect process worker, started by up.sh; the smoke sweep run from the `sweep` deployment; down.sh."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "infra" / "local"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
@pytest.mark.s3
def test_local_stack_runs_the_smoke_sweep_from_its_deployment(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}  # the stack brings its own
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        BUTTER_LOCAL_STATE=str(tmp_path / "state"),
        BUTTER_PREFECT_PORT=str(_free_port()),
        BUTTER_DASK_PORT=str(_free_port()),
        BUTTER_S3_PORT="18333",  # SeaweedFS takes this port and the seven after it
        BUTTER_DASK_WORKERS="2",
    )

    def sh(script: str, *args: str, timeout: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(LOCAL / script), *args], env=env, capture_output=True, text=True, timeout=timeout
        )

    try:
        up = sh("up.sh", timeout=300)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        assert "butter's local stack is up" in up.stdout
        smoke = sh("smoke.sh", timeout=900)
        assert smoke.returncode == 0, smoke.stdout[-3000:] + smoke.stderr[-3000:]
        assert "Flow run finished successfully" in smoke.stdout
        row = next(line for line in smoke.stdout.splitlines() if "smoke" in line and "%" in line)
        assert "12 (100%)" in row, smoke.stdout[-2000:]
        for flow, name in (
            ("butter-publish", "publish"),
            ("butter-summarize", "summarize"),
            ("butter-maintain", "maintain"),
        ):
            command = f'. "$BUTTER_LOCAL_STATE/env" && prefect --no-prompt deployment run {flow}/{name} --watch'
            ran = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=600)
            assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
            assert "finished successfully" in ran.stdout, ran.stdout[-2000:]
        credentials = (tmp_path / "state" / "credentials").read_text()
        secret = credentials.split("AWS_SECRET_ACCESS_KEY=", 1)[1].strip()
        assert secret not in up.stdout + up.stderr + smoke.stdout + smoke.stderr  # never printed
    finally:
        down = sh("down.sh", timeout=120)
    assert down.returncode == 0, down.stderr
    assert not list((tmp_path / "state").glob("*.pid"))
