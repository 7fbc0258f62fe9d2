"""Checkpoints of a stacked model in training, so that a run on a preempted or killed worker resumes.

Every ``every`` epochs the trainer saves what the rest of training depends on: weights, optimizer slots
and step count, each member's torch generator (its shuffles), the metrics recorded so far and the
divergence state. A resumed group therefore records exactly what an uninterrupted one would (same device,
same torch). Checkpoints live in the store, ``<store>/checkpoints/<key>.pt``, written whole or not at all,
so that a worker on another machine can pick them up; they hold only tensors and plain numbers and load
with ``torch.load(..., weights_only=True)`` (no pickled code). A checkpoint is removed once its runs are
staged; one that cannot be read is logged, removed and training starts afresh.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass

import torch

from butter_pipeline.retry import is_transient, retrying
from butter_pipeline.settings import SETTINGS, setting
from butter_pipeline.store import Store, write_atomically

CHECKPOINTS = "checkpoints"
DEFAULT_EVERY_EPOCHS = int(SETTINGS["BUTTER_CHECKPOINT_EVERY"][0])
FORMAT = 1  # bumped when the saved state changes shape; older checkpoints are ignored

log = logging.getLogger(__name__)


def every_epochs() -> int:
    """Epochs between checkpoints: ``BUTTER_CHECKPOINT_EVERY`` (0 turns checkpoints off), default 100."""
    return int(setting("BUTTER_CHECKPOINT_EVERY"))


def checkpoint_key(run_ids: list[str]) -> str:
    """Stable name of a stacked model's checkpoint: its members' run ids, in order."""
    return "c" + hashlib.sha256(",".join(run_ids).encode()).hexdigest()[:31]


@dataclass(frozen=True)
class Checkpoints:
    """Where a worker saves and finds checkpoints, and how often it saves them."""

    store: Store
    every: int = DEFAULT_EVERY_EPOCHS

    def _path(self, key: str) -> str:
        return self.store.path(CHECKPOINTS, f"{key}.pt")

    def due(self, epoch: int, last_epoch: int) -> bool:
        """Whether to save after ``epoch``: every ``every`` epochs, never after the last (staging follows)."""
        return self.every > 0 and epoch % self.every == 0 and epoch < last_epoch

    def save(self, key: str, state: dict) -> None:
        buffer = io.BytesIO()
        torch.save({"format": FORMAT, **state}, buffer)
        try:
            write_atomically(self.store, self._path(key), buffer.getvalue())
        except Exception as exc:  # a missed checkpoint costs a longer resume, not the run: train on
            if not is_transient(exc):
                raise
            log.warning("checkpoint %s not saved (%s); training goes on", self._path(key), exc)

    def load(self, key: str, device: torch.device) -> dict | None:
        """The saved state of ``key``, or None when there is none (or it cannot be used)."""
        path = self._path(key)
        try:
            payload = retrying(f"store {self.store.uri}: reading checkpoint {key}", self.store.fs.cat_file, path)
        except FileNotFoundError:  # the common case: nothing saved for these runs
            return None
        try:
            state = torch.load(io.BytesIO(payload), map_location=device, weights_only=True)
        except Exception as exc:  # truncated, corrupted or from an incompatible torch: train afresh
            log.warning("checkpoint %s is unreadable (%s); training from the start", path, exc)
            self.remove(key)
            return None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            log.warning("checkpoint %s has an unknown format; training from the start", path)
            self.remove(key)
            return None
        return state

    def remove(self, key: str) -> None:
        try:
            self.store.fs.rm(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as exc:  # a leftover checkpoint costs space, not correctness
            log.warning("could not remove checkpoint %s: %s", self._path(key), exc)
