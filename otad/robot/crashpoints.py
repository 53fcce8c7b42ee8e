"""Test-only: kill or freeze the robot daemon at a named step, to prove crash and power-loss recovery.

Two hooks, both read from the environment at every step, so the tests can aim at the
exact instants between the writes of an install or a rollback:

- OTAD_TEST_CRASH_AT=step: the daemon sends itself SIGKILL on reaching that step, exactly
  what `kill -9` does at that instant (every write in the page cache survives).
- OTAD_TEST_POWERCUT_DIR=folder: on reaching a step, the daemon removes the file of that
  name from the folder (e.g. `folder/current-linked`) and, if there was one, the thread at
  the step sends itself SIGSTOP (pthread_kill), which stops it before it returns, and the
  other threads after it. The power-cut loop (tests/powercut_robot.py) waits until every
  thread is stopped (state T in /proc/PID/task/*/stat), cuts the power of the layer under
  it at that instant (every write not yet durable is lost), then SIGKILLs it. The file is
  consumed, so the restart after the cut runs the same steps without stopping, and one
  long-running robot can be aimed at a different step for every cut. The folder must not
  be on the layer under test.

Unset in production (the units never set them), they cost two dictionary lookups per step.
"""
from __future__ import annotations

import os
import signal
import threading

INSTALL_STEPS = (
    "downloaded", "verified", "unpacked", "new-linked", "old-linked", "current-linked", "new-removed",
    "restarted", "selftest-passed", "committed", "gc-done",
)
ROLLBACK_STEPS = ("rb-started", "rb-current-linked", "rb-old-linked", "rb-restarted", "rb-recorded")


def crashpoint(step: str) -> None:
    if os.environ.get("OTAD_TEST_CRASH_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)
    folder = os.environ.get("OTAD_TEST_POWERCUT_DIR")
    if folder:
        _stop_if_armed(folder, step)


def _stop_if_armed(folder: str, step: str) -> None:
    try:
        os.unlink(os.path.join(folder, step))  # the test armed this step: consume it, then freeze
    except FileNotFoundError:
        return
    # To this thread, not the process: a stop sent to the process is taken by whichever thread
    # the kernel wakes for it (the idle main thread), and this one would run on meanwhile,
    # past the step. Taking it itself, this thread stops before it returns; the others follow.
    signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
