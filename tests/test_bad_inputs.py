"""The bad input corpus (tests/bad_inputs/cases.toml): every case fails in one line, exit 2, and changes nothing.

Each case is one `butter` command run as a subprocess in a fresh, empty working folder. It must exit with
status 2 and print exactly one line on stderr, ``error: ...``, that holds the case's ``expect`` substrings;
no traceback anywhere, no secret from the environment in the output, nothing created in the working folder,
and the store it names exactly as it was (every file's name and sha256; for a store whose bad staged unit
must be quarantined, everything but ``staging/`` and ``quarantine/``).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow
import pyarrow.parquet as pq
import pytest

from butter_pipeline.s3server import S3Server

BUTTER = str(Path(sys.executable).parent / "butter")
CORPUS = Path(__file__).resolve().parent / "bad_inputs"
CASES: list[dict[str, Any]] = tomllib.loads((CORPUS / "cases.toml").read_text(encoding="utf-8"))["case"]
S3_PUBLISHED = "bad-inputs/published"
SETUP_UNITS = {
    "corrupt_staged_runs": "u-corrupt",
    "staged_extra_column": "u-extra-column",
    "staged_wrong_type": "u-wrong-type",
    "staged_breaks_contract": "u-breaks-contract",
}
SECRET_NAMES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
FIELDS = {"id", "args", "file", "expect", "env", "unset_env", "s3", "setup", "quarantine"}


def _params() -> list[Any]:
    params = []
    for case in CASES:
        marks = [pytest.mark.s3] if case.get("s3") else []
        params.append(pytest.param(case, id=case["id"], marks=marks))
    return params


def test_the_corpus_is_complete():
    ids = [case["id"] for case in CASES]
    assert len(ids) == len(set(ids)) >= 30
    for case in CASES:
        assert set(case) <= FIELDS, case["id"]
        assert case["expect"], case["id"]
        if "{case_file}" in " ".join(case["args"]):
            assert (CORPUS / case.get("file", f"{case['id']}.toml")).is_file(), case["id"]
    used = {case.get("file", f"{case['id']}.toml") for case in CASES if "{case_file}" in " ".join(case["args"])}
    assert {p.name for p in CORPUS.glob("*.toml")} - {"cases.toml"} == used  # no stray case files


# --- stores the cases run against ------------------------------------------------------------------------------


def _butter(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: int = 300):
    return subprocess.run(
        [BUTTER, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd
    )


def _publish_synthetic(uri: str, env: dict[str, str] | None = None) -> None:
    from unittest import mock

    from butter_pipeline.stage import stage_result
    from butter_pipeline.store import open_store
    from butter_pipeline.synthetic import synthetic_tables

    runs, epochs = synthetic_tables(8, 3, datasets=("529_pollen", "adult"), seed=7)
    with mock.patch.dict(os.environ, env or {}):
        stage_result(open_store(uri), "u1", runs, epochs)
    for command in ("publish", "summarize"):
        result = _butter(command, "--store", uri, env=env)
        assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def published_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local store with published runs, epochs and summaries; each case gets its own copy."""
    folder = tmp_path_factory.mktemp("bad-inputs") / "store"
    _publish_synthetic(str(folder))
    return folder


@pytest.fixture(scope="module")
def s3_published(s3_server: S3Server) -> str:
    uri = f"s3://{s3_server.bucket}/{S3_PUBLISHED}"
    _publish_synthetic(uri, env=s3_server.env())
    return uri


def _snapshot_local(root: Path, *, skip: tuple[str, ...] = ()) -> dict[str, str]:
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith(skip):
            files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def _snapshot_s3(server: S3Server, prefix: str) -> dict[str, str]:
    fs = server.filesystem()
    root = f"{server.bucket}/{prefix}"
    return {key[len(root) :]: str(info.get("ETag")) for key, info in fs.find(root, detail=True).items()}


# --- setups ----------------------------------------------------------------------------------------------------


def _stage_raw(store: Path, unit: str, runs: bytes, epochs: bytes) -> None:
    """Write a staged unit as a worker would, but without the worker's contract check."""
    folder = store / "staging" / unit
    folder.mkdir(parents=True)
    (folder / "epochs.parquet").write_bytes(epochs)
    (folder / "runs.parquet").write_bytes(runs)  # last: the unit is complete


def _parquet(table: pyarrow.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _fresh_tables(seed: int) -> tuple[pyarrow.Table, pyarrow.Table]:
    from butter_pipeline.synthetic import synthetic_tables

    return synthetic_tables(2, 3, datasets=("banana",), seed=seed)


def _set(table: pyarrow.Table, name: str, values: np.ndarray) -> pyarrow.Table:
    index = table.schema.get_field_index(name)
    return table.set_column(index, table.schema.field(name), pyarrow.array(values, table.schema.field(name).type))


def _setup(kind: str, store: Path, data_home: Path) -> None:
    if kind == "corrupt_cache":
        from butter_pipeline.tasks import manifest

        entry = manifest()["529_pollen"][0]
        cached = data_home / entry.name / entry.file
        cached.parent.mkdir(parents=True)
        cached.write_bytes(b"\x1f\x8b this is not the pinned 529_pollen file")
    elif kind == "corrupt_staged_runs":
        runs, epochs = _fresh_tables(101)
        _stage_raw(store, SETUP_UNITS[kind], _parquet(runs)[:-200] + b"garbage", _parquet(epochs))
    elif kind == "staged_extra_column":
        runs, epochs = _fresh_tables(102)
        runs = runs.append_column("notes", pyarrow.array(["hand-edited"] * runs.num_rows))
        _stage_raw(store, SETUP_UNITS[kind], _parquet(runs), _parquet(epochs))
    elif kind == "staged_wrong_type":
        runs, epochs = _fresh_tables(104)
        index = runs.schema.get_field_index("depth")
        runs = runs.set_column(index, "depth", pyarrow.array(["three"] * runs.num_rows))
        _stage_raw(store, SETUP_UNITS[kind], _parquet(runs), _parquet(epochs))
    elif kind == "staged_breaks_contract":
        runs, epochs = _fresh_tables(103)
        accuracy = np.full(epochs.num_rows, 1.5, dtype=np.float32)
        loss = epochs.column("test_loss").to_numpy().copy()
        loss[1] = np.nan
        epochs = _set(_set(epochs, "test_accuracy", accuracy), "test_loss", loss)
        _stage_raw(store, SETUP_UNITS[kind], _parquet(runs), _parquet(epochs))
    else:
        raise AssertionError(f"unknown setup {kind!r}")


# --- the corpus ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _params())
def test_bad_input(case: dict[str, Any], tmp_path: Path, request: pytest.FixtureRequest, published_store: Path):
    cwd, store, data_home = tmp_path / "cwd", tmp_path / "store", tmp_path / "data-home"
    cwd.mkdir()
    shutil.copytree(published_store, store)
    (tmp_path / "empty-dir").mkdir()
    values = {
        "case_file": str(CORPUS / case.get("file", f"{case['id']}.toml")),
        "store": str(store),
        "missing": str(tmp_path / "no-such-thing"),
        "empty_dir": str(tmp_path / "empty-dir"),
        "data_home": str(data_home),
    }
    # hermetic: no credentials, endpoint or Prefect profile from the developer's environment
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BUTTER_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), BUTTER_DATA_HOME=str(tmp_path / "empty-data-home"))
    server: S3Server | None = None
    if case.get("s3"):
        server = request.getfixturevalue("s3_server")
        request.getfixturevalue("s3_published")
        values.update(
            s3_store=f"s3://{server.bucket}/{S3_PUBLISHED}",
            s3_missing=f"s3://{server.bucket}/bad-inputs/missing/{case['id']}",
            s3_bucket=server.bucket,
            s3_endpoint=server.endpoint,
        )
        env.update(server.env())
    env.update({name: value.format(**values) for name, value in case.get("env", {}).items()})
    for name in case.get("unset_env", []):
        env.pop(name, None)
    args = [arg.format(**values) for arg in case["args"]]
    if case.get("setup"):
        _setup(case["setup"], store, data_home)

    skip = ("staging/", "quarantine/") if case.get("quarantine") else ()
    before_local = _snapshot_local(store, skip=skip)
    before_s3 = _snapshot_s3(server, S3_PUBLISHED) if server else {}

    result = subprocess.run([BUTTER, *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    output = result.stdout + result.stderr

    assert "Traceback" not in output, output[-3000:]
    lines = result.stderr.removesuffix("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line:\n{result.stderr[-3000:]}"
    for expected in case["expect"]:
        assert expected in lines[0], f"{expected!r} not in {lines[0]!r}"
    assert result.returncode == 2, output[-3000:]
    for name in SECRET_NAMES:
        for secret in {env.get(name), os.environ.get(name), server and server.secret_key} - {None, ""}:
            assert secret not in output, f"a secret ({name}) is in the output"

    assert _snapshot_local(store, skip=skip) == before_local, "the store changed"
    assert list(cwd.iterdir()) == [], "the command created files in its working folder"
    if server:
        assert _snapshot_s3(server, S3_PUBLISHED) == before_s3, "the S3 store changed"
        assert _snapshot_s3(server, f"bad-inputs/missing/{case['id']}") == {}, "an S3 store was created"
    if case.get("quarantine"):
        unit = SETUP_UNITS[case["setup"]]
        assert (store / "quarantine" / unit / "report.json").is_file(), "the bad unit was not quarantined"
        assert not (store / "staging" / unit / "runs.parquet").exists(), "the bad unit is still staged"
