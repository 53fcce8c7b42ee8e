"""Test-only: kill the robot daemon at a named step, to prove crash recovery.

When OTAD_TEST_CRASH_AT names a step (e.g. `current-linked`), the daemon sends
itself SIGKILL on reaching it: exactly what a power cut or `kill -9` does at
that instant. Unset in production (the units never set it), it costs one
dictionary lookup per step.
"""
from __future__ import annotations

import os
import signal

INSTALL_STEPS = (
    "verified", "unpacked", "new-linked", "old-linked", "current-linked", "new-removed",
    "restarted", "selftest-passed", "committed", "gc-done",
)
ROLLBACK_STEPS = ("rb-started", "rb-current-linked", "rb-old-linked", "rb-restarted", "rb-recorded")


def crashpoint(step: str) -> None:
    if os.environ.get("OTAD_TEST_CRASH_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)
