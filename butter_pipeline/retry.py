"""Store I/O that outlasts a short outage: retried with exponential backoff, then a clear error.

An S3 endpoint that restarts, or a network that drops for a minute, must delay a sweep, not lose trained
work: a worker holding a trained group retries its staging writes; the publisher, whose every step is
idempotent, retries the whole publish. Only errors that can pass are retried (connection failures,
timeouts, I/O errors); a missing object, refused credentials or damaged bytes are answers, raised at once.
The budget is ``BUTTER_STORE_RETRY_SECONDS`` (default 600) of waiting per operation. A refusal
(``PermissionError``: read-only credentials) becomes one ``StoreError`` line at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from butter_pipeline.errors import ButterError, StoreError
from butter_pipeline.settings import setting

FIRST_DELAY_SECONDS, MAX_DELAY_SECONDS = 1.0, 30.0
_ANSWERS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)

T = TypeVar("T")
log = logging.getLogger(__name__)


def budget_seconds() -> float:
    return float(setting("BUTTER_STORE_RETRY_SECONDS"))


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` may pass if the same request is made again later."""
    if isinstance(error, (ButterError, *_ANSWERS)):
        return False
    if isinstance(error, OSError | TimeoutError | ConnectionError):
        return True
    try:
        from botocore import exceptions as boto
    except ImportError:  # a local-only installation
        return False
    return isinstance(error, boto.ConnectionError | boto.HTTPClientError)


def _reason(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def retrying(what: str, operation: Callable[..., T], *args: object, **kwargs: object) -> T:
    """``operation(*args, **kwargs)``, retried on transient errors for up to the budget; then ``StoreError``
    naming ``what`` (e.g. "store s3://b/p: staging unit u12") and the last error."""
    budget = budget_seconds()
    delay, waited = FIRST_DELAY_SECONDS, 0.0
    while True:
        try:
            return operation(*args, **kwargs)
        except PermissionError as exc:  # refused, not failed: read-only credentials, a read-only folder
            raise StoreError(
                f"{what}: access denied ({_reason(exc)}); these credentials (AWS_ACCESS_KEY_ID) or this user "
                "may not write there"
            ) from None
        except Exception as exc:
            if not is_transient(exc):
                raise
            if waited >= budget:
                raise StoreError(
                    f"{what}: the store did not answer for {waited:.0f} s ({_reason(exc)}); staged work is kept: "
                    "run the same command again when the store is back"
                ) from None
            log.warning("%s: %s; retrying in %.0f s", what, _reason(exc), delay)
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, MAX_DELAY_SECONDS)
