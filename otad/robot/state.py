"""The robot's persisted state: install phase, attempts, blacklist, last failure.

One JSON file, replaced atomically before each step of an install or a
rollback, so a restart after `kill -9` knows exactly which step was running.
`StateLock` (flock on STATE_DIR/lock) keeps `otadctl` from racing the daemon.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from otad.errors import OtadError
from otad.fsutil import atomic_write_bytes

PHASES = ("idle", "unpacking", "activating", "selftest", "probation", "rolling_back")


@dataclass
class RobotState:
    phase: str = "idle"
    target: str | None = None  # the version being installed (or on probation)
    previous: str | None = None  # CURRENT before the activation
    previous_old: str | None = None  # OLD before the activation
    committed: str | None = None  # what CURRENT is when idle
    highest_committed: str | None = None  # with CURRENT, the anti-rollback floor (otad/trust/rollback.py)
    attempts: dict[str, int] = field(default_factory=dict)
    blacklist: list[str] = field(default_factory=list)
    last_failure: dict | None = None  # {"version", "reason", "at"}
    probation_until: float | None = None


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "state.json"
        state_dir.mkdir(parents=True, exist_ok=True)

    def load(self) -> RobotState:
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return RobotState()
        except (OSError, ValueError) as exc:
            raise OtadError(f"{self.path}: unreadable state ({exc}); move it aside to start afresh") from None
        known = {f.name for f in dataclasses.fields(RobotState)}
        state = RobotState(**{k: v for k, v in doc.items() if k in known})
        if state.phase not in PHASES:
            raise OtadError(f"{self.path}: unknown phase {state.phase!r}")
        return state

    def save(self, state: RobotState) -> None:
        atomic_write_bytes(self.path, (json.dumps(dataclasses.asdict(state), indent=1, sort_keys=True) + "\n").encode())


class Busy(OtadError):
    """Another process (the daemon, or another otadctl) holds the state lock."""


class StateLock:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "lock"
        self._fd: int | None = None

    def acquire(self, wait: bool) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise Busy("otad-robot is changing releases right now") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "StateLock":
        self.acquire(wait=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
