"""Named points where a test can make this process die, to prove that crashes lose and duplicate nothing.

A process started with ``BUTTER_FAILPOINT=<name>`` exits at once, without clean-up (``os._exit``), when it
reaches ``failpoint(<name>)``: the same state a SIGKILL or a lost machine leaves behind. Unset, a failpoint
costs one dictionary lookup.
"""

from __future__ import annotations

import os

FAILPOINT_EXIT_STATUS = 86


def failpoint(name: str) -> None:
    if os.environ.get("BUTTER_FAILPOINT") == name:
        os._exit(FAILPOINT_EXIT_STATUS)
