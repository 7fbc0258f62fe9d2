"""A store is a URI: a local folder or ``s3://bucket/prefix``. This module resolves one.

S3 credentials and the endpoint come from the environment only (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, optional ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL`` for S3-compatible servers
such as SeaweedFS, ``AWS_REGION``); they are passed to s3fs and delta-rs and never logged or stored.

Layout under the store::

    runs/  epochs/    Delta tables (published)
    staging/<unit>/   immutable staged results of one trained group: epochs.parquet, then runs.parquet (last)
    quarantine/<unit>/  results that broke the data contract, with report.json
    _publish/         the publisher's in-flight commit record
"""

from __future__ import annotations

import errno
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs

from butter_pipeline.errors import StoreError

DEFAULT_STORE = "./butter-data"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class Store:
    """A resolved store: where it is, the filesystem that reaches it, and options for delta-rs."""

    uri: str  # normalised: an absolute local path, or s3://bucket/prefix without a trailing slash
    fs: fsspec.AbstractFileSystem = field(repr=False, compare=False)
    root: str  # the store's path as ``fs`` names it
    storage_options: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_local(self) -> bool:
        return not self.uri.startswith("s3://")

    def path(self, *parts: str) -> str:
        """A path inside the store, as ``fs`` names it."""
        return "/".join([self.root.rstrip("/"), *parts])

    def arrow_filesystem(self, *parts: str) -> pafs.FileSystem:
        """A pyarrow filesystem rooted at ``parts`` inside the store, for reading Parquet natively.

        Readers use it instead of the filesystem delta-rs hands to pyarrow, whose Rust runtime can abort
        the interpreter at exit ("terminate called without an active exception", deltalake 1.6).
        """
        if self.is_local:
            return pafs.SubTreeFileSystem(self.path(*parts), pafs.LocalFileSystem())
        options = self.storage_options
        endpoint = options.get("AWS_ENDPOINT_URL")
        s3 = pafs.S3FileSystem(
            access_key=options.get("AWS_ACCESS_KEY_ID"),
            secret_key=options.get("AWS_SECRET_ACCESS_KEY"),
            session_token=options.get("AWS_SESSION_TOKEN"),
            region=options.get("AWS_REGION"),
            endpoint_override=endpoint.split("://", 1)[1] if endpoint else None,
            scheme="http" if endpoint and endpoint.startswith("http://") else "https",
            anonymous=not options.get("AWS_ACCESS_KEY_ID"),
        )
        return pafs.SubTreeFileSystem(self.path(*parts), s3)

    def table_uri(self, name: str) -> str:
        """The URI delta-rs opens for table ``name``."""
        return f"{self.uri.rstrip('/')}/{name}"


def s3_options_from_env() -> tuple[dict[str, Any], dict[str, str]]:
    """(s3fs kwargs, delta-rs storage options) from the standard AWS environment variables."""
    key = os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    token = os.environ.get("AWS_SESSION_TOKEN")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    fs_kwargs: dict[str, Any] = {"client_kwargs": {"region_name": region}}
    delta: dict[str, str] = {"AWS_REGION": region}
    if key and secret:
        fs_kwargs.update(key=key, secret=secret)
        delta.update(AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret)
        if token:
            fs_kwargs["token"] = token
            delta["AWS_SESSION_TOKEN"] = token
    if endpoint:
        fs_kwargs["client_kwargs"]["endpoint_url"] = endpoint
        delta["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            delta["AWS_ALLOW_HTTP"] = "true"
    return fs_kwargs, delta


def open_store(uri: str | os.PathLike[str] = DEFAULT_STORE, *, create: bool = True) -> Store:
    """Resolve ``uri`` to a ``Store``; raises ``StoreError`` naming the URI when it cannot be used."""
    text = str(uri).strip()
    if not text:
        raise StoreError("store URI is empty; give a folder path or s3://bucket/prefix")
    parsed = urlparse(text)
    if parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt"):
        path = Path(parsed.path if parsed.scheme == "file" else text).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise StoreError(f"store {text!r}: {path} exists and is not a folder")
        if create:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"store {text!r}: cannot create folder {path} ({exc.strerror})") from None
        return Store(uri=str(path), fs=fsspec.filesystem("file"), root=str(path))
    if parsed.scheme in ("s3", "s3a"):
        bucket, prefix = parsed.netloc, parsed.path.strip("/")
        if not _BUCKET.match(bucket):
            raise StoreError(f"store {text!r}: {bucket!r} is not a valid S3 bucket name")
        if parsed.query or parsed.fragment:
            raise StoreError(f"store {text!r}: an S3 store URI has no query or fragment")
        fs_kwargs, delta_options = s3_options_from_env()
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **fs_kwargs)
        root = f"{bucket}/{prefix}" if prefix else bucket
        normalised = f"s3://{root}"
        return Store(uri=normalised, fs=fs, root=root, storage_options=delta_options)
    raise StoreError(f"store {text!r}: unsupported scheme {parsed.scheme!r}; use a folder or s3://bucket/prefix")


def check_reachable(store: Store) -> None:
    """Fail early, with one clear line, when an S3 store's bucket cannot be listed with these credentials."""
    if store.is_local:
        return
    bucket = store.root.split("/", 1)[0]
    try:
        store.fs.ls(bucket, refresh=True)
    except FileNotFoundError:
        raise StoreError(f"store {store.uri}: bucket {bucket!r} does not exist") from None
    except PermissionError:
        raise StoreError(f"store {store.uri}: access denied; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY") from None
    except Exception as exc:  # botocore raises many types (no credentials, endpoint down, ...)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StoreError(f"store {store.uri}: cannot reach the bucket ({reason})") from None


def write_atomically(store: Store, path: str, payload: bytes) -> None:
    """Write ``payload`` at ``path`` so that readers see all of it or nothing (temp name + rename locally;
    a PUT is atomic on S3)."""
    if store.is_local:
        parent = path.rsplit("/", 1)[0]
        store.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with store.fs.open(tmp, "wb") as handle:
            handle.write(payload)
        store.fs.mv(tmp, path)
    else:
        store.fs.pipe_file(path, payload)


def create_exclusive(store: Store, path: str, payload: bytes) -> bool:
    """Write ``payload`` at ``path`` only if nothing is there (O_EXCL locally, If-None-Match on S3)."""
    if store.is_local:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path, "xb") as handle:
                handle.write(payload)
        except FileExistsError:
            return False
        return True
    try:
        store.fs.pipe_file(path, payload, mode="create")
    except FileExistsError:
        return False
    except OSError as exc:  # s3fs maps a 412 that lacks its condition header (SeaweedFS) to EINVAL
        code = getattr(exc.__cause__, "response", {}).get("Error", {}).get("Code")
        if exc.errno == errno.EINVAL and code == "PreconditionFailed":
            return False
        raise
    return True
