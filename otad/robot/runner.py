"""Run the operator's restart, self-test and health commands with a deadline.

Each runs in its own process group, so a timeout kills the whole tree (a
self-test that forked a server does not outlive its deadline). Output is
kept as a short tail for the rollback reason.
"""
from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

TAIL_BYTES = 600


@dataclass(frozen=True)
class Outcome:
    ok: bool
    reason: str  # one line: "exit 1", "timed out after 60s", ...
    tail: str  # last lines of stdout+stderr
    returncode: int | None = None  # None: it could not run, or was killed at its deadline


def run(command: list[str] | str, timeout: float, cwd: Path | None = None, env: dict[str, str] | None = None) -> Outcome:
    argv = ["/bin/sh", "-c", command] if isinstance(command, str) else command
    try:
        proc = subprocess.Popen(
            argv, cwd=cwd, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
    except OSError as exc:
        return Outcome(False, f"cannot run: {exc.strerror}", "")
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        output, _ = proc.communicate()
        return Outcome(False, f"timed out after {timeout:.0f}s", _tail(output))
    _kill_group(proc)  # leftovers of a finished command must not linger
    if proc.returncode != 0:
        return Outcome(False, f"exit {proc.returncode}", _tail(output), proc.returncode)
    return Outcome(True, "ok", _tail(output), 0)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(output: bytes | None) -> str:
    text = (output or b"")[-TAIL_BYTES:].decode("utf-8", "replace")
    return " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())
