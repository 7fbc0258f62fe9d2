"""The numbers butter reads from the environment (``BUTTER_*``), all read and checked one way: a bad value
is one ``ButterError`` line naming the variable, what it got and what it takes."""

from __future__ import annotations

import os

from butter_pipeline.errors import ButterError

# name -> (default, whole number?, smallest allowed, what it means)
SETTINGS: dict[str, tuple[float, bool, float, str]] = {
    "BUTTER_RUN_ATTEMPTS": (3, True, 1, "times a run that raises is trained before it is recorded as failed"),
    "BUTTER_CHECKPOINT_EVERY": (100, True, 0, "epochs between checkpoints; 0: no checkpoints"),
    "BUTTER_STORE_RETRY_SECONDS": (600.0, False, 0, "seconds store I/O is retried before it gives up"),
    "BUTTER_TORCH_THREADS": (1, True, 1, "torch threads per worker process"),
}


def setting(name: str) -> int | float:
    """The value of setting ``name`` (a key of ``SETTINGS``) from the environment, or its default."""
    default, whole, minimum, meaning = SETTINGS[name]
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value: int | float = int(text) if whole else float(text)
    except ValueError:
        value = minimum - 1  # refused below, with the same message
    if not value >= minimum:  # also refuses nan
        kind = "a whole number" if whole else "a number"
        raise ButterError(f"{name}={text!r} must be {kind} >= {minimum:g} ({meaning})")
    return value


def check_settings() -> None:
    """Refuse a bad ``BUTTER_*`` number before any work starts (workers would fail on it much later)."""
    for name in SETTINGS:
        setting(name)
