"""Credentials stay secret: a real sweep into S3 leaves the secret key in no output, table, log or Prefect record.

The SeaweedFS server's secret key is random per test session, so it is a recognisable string: after
``butter run smoke`` into S3 (DEBUG logging, Prefect's and Dask's logs shown), the test searches the
command's output, every object of the store (raw bytes, and Parquet files decoded, since zstd hides their
strings), the Prefect API's flow runs (parameters, states), task runs, logs, artifacts, variables and
blocks, the Prefect database, and every file the run left in its working, home and temporary folders.
A planted token, put in each kind of place the same way, shows that the search would find it.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow
import pyarrow.parquet as pq
import pytest

from butter_pipeline.s3server import S3Server

BUTTER = str(Path(sys.executable).parent / "butter")
PAGE = 200  # the Prefect API's default page size


def _needles(secret: str) -> list[str]:
    """The secret, and its random part alone (in case it were cut, quoted or re-prefixed)."""
    return [secret, secret.removeprefix("secret-")]


def _parquet_text(payload: bytes) -> str:
    """A Parquet file's values and metadata as text: its strings may sit in compressed pages."""
    try:
        file = pq.ParquetFile(io.BytesIO(payload))
        table = file.read()
    except (pyarrow.ArrowException, OSError, ValueError):
        return ""
    metadata = {**(file.schema_arrow.metadata or {})}
    return json.dumps(table.to_pylist(), default=str) + repr(metadata)


def _blob_texts(name: str, payload: bytes) -> Iterator[tuple[str, str]]:
    yield name, payload.decode("utf-8", "replace")
    if name.endswith(".parquet") or payload[:4] == b"PAR1":
        yield f"{name} (decoded)", _parquet_text(payload)


def store_texts(server: S3Server, prefix: str) -> Iterator[tuple[str, str]]:
    fs = server.filesystem()
    keys = fs.find(f"{server.bucket}/{prefix}")
    assert keys, f"nothing under s3://{server.bucket}/{prefix}"
    for key in keys:
        yield from _blob_texts(f"s3://{key}", fs.cat_file(key))


def folder_texts(*folders: Path) -> Iterator[tuple[str, str]]:
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                yield from _blob_texts(str(path), path.read_bytes())


def _pages(read, **kwargs) -> Iterator[object]:
    offset = 0
    while True:
        page = read(limit=PAGE, offset=offset, **kwargs)
        yield from page
        if len(page) < PAGE:
            return
        offset += PAGE


def prefect_texts() -> Iterator[tuple[str, str]]:
    """Every flow run (parameters, state, states), task run, log, artifact, variable and block of the API."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for run in _pages(client.read_flow_runs):
            yield f"flow run {run.name}", run.model_dump_json()
            for state in client.read_flow_run_states(run.id):
                yield f"flow run {run.name} state", state.model_dump_json()
        for run in _pages(client.read_task_runs):
            yield f"task run {run.name}", run.model_dump_json()
        for log in _pages(client.read_logs):
            yield f"log {log.name}", log.model_dump_json()
        for artifact in _pages(client.read_artifacts):
            yield f"artifact {artifact.key}", artifact.model_dump_json()
        for variable in client.read_variables(limit=PAGE):
            yield f"variable {variable.name}", variable.model_dump_json()
        for block in client.read_block_documents(include_secrets=False, limit=PAGE, offset=0):
            yield f"block {block.name}", block.model_dump_json()


def prefect_database_texts() -> Iterator[tuple[str, str]]:
    """The Prefect test server's SQLite database (and its journal), byte for byte."""
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    url = PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
    path = Path(url.split(":///", 1)[1]) if url and url.startswith("sqlite") else None
    assert path is not None and path.is_file(), f"no Prefect database at {url!r}"
    yield from folder_texts(path.parent)


def found_in(needles: list[str], texts) -> list[str]:
    """The places (names of the texts) where any needle occurs."""
    return [place for place, text in texts if any(needle in text for needle in needles)]


@pytest.fixture
def planted(s3_server: S3Server, prefect_api_url: str, tmp_path: Path) -> Iterator[str]:
    """A token put where the secret must never be, the way a leak would put it there."""
    from prefect import flow, get_run_logger
    from prefect.artifacts import create_markdown_artifact
    from prefect.logging.handlers import APILogHandler

    token = f"planted-{uuid.uuid4().hex}"
    table = pyarrow.table({"note": [f"{token}-{i}" for i in range(1000)]})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    s3_server.filesystem().pipe_file(f"{s3_server.bucket}/secrets-planted/data.parquet", sink.getvalue())
    (tmp_path / "planted" / "logs").mkdir(parents=True)
    (tmp_path / "planted" / "logs" / "worker.log").write_text(f"connecting with {token}\n")

    @flow(name="planted-secret")
    def leaky(value: str) -> None:
        get_run_logger().info("using %s", value)
        create_markdown_artifact(key=f"planted-{uuid.uuid4().hex[:8]}", markdown=f"key: {value}")

    leaky(token)
    APILogHandler().flush()  # the flow's logs reach the API before they are searched
    yield token
    s3_server.filesystem().rm(f"{s3_server.bucket}/secrets-planted", recursive=True)


@pytest.mark.integration
@pytest.mark.s3
def test_the_secret_key_is_nowhere(s3_server: S3Server, prefect_api_url: str, tmp_path: Path, planted: str):
    cwd, home, tmp = tmp_path / "cwd", tmp_path / "prefect-home", tmp_path / "tmp"
    for folder in (cwd, home, tmp):
        folder.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3_server.env())
    env.update(
        PREFECT_API_URL=prefect_api_url,
        PREFECT_LOGGING_LEVEL="DEBUG",
        PREFECT_HOME=str(home),
        TMPDIR=str(tmp),
        DASK_TEMPORARY_DIRECTORY=str(tmp),
    )
    uri = f"s3://{s3_server.bucket}/secrets"
    result = subprocess.run(
        [BUTTER, "run", "smoke", "--store", uri, "--max-runs", "2", "--verbose"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "published 2 runs (40 epoch rows" in result.stdout

    # the search finds a planted token in each kind of place
    token = [planted]
    in_store = found_in(token, store_texts(s3_server, "secrets-planted"))
    assert any(place.endswith("(decoded)") for place in in_store), "the store search misses decoded Parquet"
    assert found_in(token, folder_texts(tmp_path / "planted")), "the file search misses files"
    where = " ".join(found_in(token, prefect_texts()))
    assert all(kind in where for kind in ("flow run", "log", "artifact")), where
    assert found_in(token, prefect_database_texts()), "the database search misses the database"

    # and finds no trace of the secret key
    needles = _needles(s3_server.secret_key)
    assert found_in(needles, [("output", result.stdout + result.stderr)]) == []
    assert found_in(needles, store_texts(s3_server, "secrets")) == []
    assert found_in(needles, folder_texts(cwd, home, tmp)) == []
    assert found_in(needles, prefect_texts()) == []
    assert found_in(needles, prefect_database_texts()) == []
