"""Stable identities: the same experiment config gives the same ids on any machine and any version.

``experiment_id`` hashes the canonical JSON of an experiment's config (sorted keys, no whitespace, numbers
as Python writes them: ints as ints, floats in shortest round-trip form). ``run_id`` hashes the
experiment id with the repetition index, and the run's seed derives from the run id. Nothing here reads
the clock, the expansion order or the machine. Golden-id tests pin the output: changing anything in this
module changes every id in every published dataset.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

ID_HEX_CHARS = 24  # 96 bits: collision odds for 10^8 runs are about 10^-13


def canonical_json(config: dict[str, Any]) -> str:
    """The one text form of a config that ids are computed from."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def experiment_id(config: dict[str, Any]) -> str:
    """Stable id of an experiment: the hash of its canonical config."""
    return _digest("experiment:" + canonical_json(config))[:ID_HEX_CHARS]


def run_id(experiment: str, repetition: int) -> str:
    """Stable id of repetition ``repetition`` (0-based) of experiment ``experiment``."""
    return _digest(f"run:{experiment}:{repetition}")[:ID_HEX_CHARS]


def seed_of(run: str) -> int:
    """The run's seed: 63 bits derived from its run id, so it fits a signed int64 column."""
    return int.from_bytes(hashlib.sha256(f"seed:{run}".encode()).digest()[:8], "big") >> 1
