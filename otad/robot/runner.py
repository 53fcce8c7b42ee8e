"""Run the operator's restart, self-test and health commands with a deadline.

Each runs in its own process group, so a timeout kills the whole tree (a
self-test that forked a server does not outlive its deadline). Output is
kept as a short tail for the rollback reason. `alive` is called every
ALIVE_EVERY seconds while the command is still running within its deadline,
and never after it: the daemon's heartbeat shows a long self-test as
progress, but not a child that outlived its deadline and cannot be reaped.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TAIL_BYTES = 600
HEAD_BYTES = 4096  # the start of the output, for commands that answer in it (READY_CMD's retry-after=)
ALIVE_EVERY = 1.0  # seconds


@dataclass(frozen=True)
class Outcome:
    ok: bool
    reason: str  # one line: "exit 1", "timed out after 60s", ...
    tail: str  # last lines of stdout+stderr
    returncode: int | None = None  # None: it could not run, or was killed at its deadline
    head: bytes = b""  # the first HEAD_BYTES of stdout+stderr


def run(command: list[str] | str, timeout: float, cwd: Path | None = None, env: dict[str, str] | None = None,
        alive: Callable[[], None] | None = None) -> Outcome:
    argv = ["/bin/sh", "-c", command] if isinstance(command, str) else command
    try:
        proc = subprocess.Popen(
            argv, cwd=cwd, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
    except OSError as exc:
        return Outcome(False, f"cannot run: {exc.strerror}", "")
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            # communicate() may be called again after a timeout without losing output.
            output, _ = proc.communicate(timeout=max(0.0, min(left, ALIVE_EVERY)))
            break
        except subprocess.TimeoutExpired:
            if left <= ALIVE_EVERY:
                _kill_group(proc)
                output, _ = proc.communicate()
                return Outcome(False, f"timed out after {timeout:.0f}s", _tail(output), None, (output or b"")[:HEAD_BYTES])
            if alive is not None:
                alive()
    _kill_group(proc)  # leftovers of a finished command must not linger
    if proc.returncode != 0:
        return Outcome(False, f"exit {proc.returncode}", _tail(output), proc.returncode, (output or b"")[:HEAD_BYTES])
    return Outcome(True, "ok", _tail(output), 0, (output or b"")[:HEAD_BYTES])


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(output: bytes | None) -> str:
    text = (output or b"")[-TAIL_BYTES:].decode("utf-8", "replace")
    return " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())
