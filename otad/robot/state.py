"""The robot's persisted state: install phase, attempts, blacklist, last failure.

One JSON file, replaced atomically before each step of an install or a
rollback, so a restart after `kill -9` knows exactly which step was running.
`StateLock` (flock on STATE_DIR/lock) keeps `otadctl` from racing the daemon.

Every write is a read-modify-write under that lock (`StateStore.update`): a
writer changes only the fields it names, on top of what is on disk now, so
the daemon never writes an older in-memory copy over what `otadctl` changed
meanwhile (an `unblacklist` during probation, say).
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from otad.errors import OtadError
from otad.fsutil import atomic_write_bytes, make_dirs

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
    last_failure: dict | None = None  # {"version", "reason", "at", "counted"}
    # Probation is measured in seconds of health checks done, not against the wall
    # clock: a clock stepped back or forward neither stretches nor skips it, and the
    # count survives restarts and reboots (it is saved at every check).
    probation_s: float | None = None  # how long this probation lasts
    downgrade: bool = False  # the release on probation is an authorised downgrade (lowers the floor once it passes)
    probation_done: float = 0.0  # seconds of it already served
    interrupted: dict[str, int] = field(default_factory=dict)  # installs cut short by a crash, not by the release
    # The rollout plan that assigned `version` (ROLLOUT_KEYS only): {"rollout_id", "phase",
    # "version", "came_from"}. Its events carry rollout_id and phase; came_from (CURRENT before
    # the install) is where an aborted plan with on_halt=rollback may send this robot back to.
    rollout: dict | None = None


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "state.json"
        make_dirs(state_dir)
        self.lock = StateLock(state_dir)

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

    def update(self, **changes: object) -> RobotState:
        """The one way to change the state: under the lock, on top of what is on disk now."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(RobotState)}
        if unknown:
            raise TypeError(f"unknown state fields: {sorted(unknown)}")
        with self.lock:
            state = self.load()
            for key, value in changes.items():
                setattr(state, key, value)
            self._save(state)
        return state

    def _save(self, state: RobotState) -> None:
        atomic_write_bytes(self.path, (json.dumps(dataclasses.asdict(state), indent=1, sort_keys=True) + "\n").encode())


class Busy(OtadError):
    """Another process (the daemon, or another otadctl) holds the state lock."""


class StateLock:
    """flock(2) on STATE_DIR/lock, re-entrant within a process.

    Re-entrant because a holder (an install, otadctl) writes the state through
    `StateStore.update`, which takes the lock too; a second flock on a fresh file
    descriptor would deadlock against the first. The thread lock keeps the daemon's
    threads from sharing one hold by accident.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "lock"
        self._fd: int | None = None
        self._depth = 0
        self._thread_lock = threading.RLock()

    def acquire(self, wait: bool) -> None:
        if not self._thread_lock.acquire(blocking=wait):
            raise Busy("otad-robot is changing releases right now")
        if self._depth:
            self._depth += 1
            return
        try:
            self._flock(wait)
        except BaseException:
            self._thread_lock.release()
            raise
        self._depth = 1

    def _flock(self, wait: bool) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise Busy("otad-robot is changing releases right now") from None
        self._fd = fd

    def release(self) -> None:
        if not self._depth:
            return
        self._depth -= 1
        if not self._depth and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        self._thread_lock.release()

    def __enter__(self) -> "StateLock":
        self.acquire(wait=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
