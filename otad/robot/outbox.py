"""A small durable outbox of update events, drained by the telemetry agent.

Each event is one JSON file `STATE_DIR/outbox/<seq>.json`, written atomically;
the agent sends them in `seq` order and deletes each once the gateway has
acknowledged it. A file per event keeps appends crash-safe without a database.
"""
from __future__ import annotations

import fcntl
import json
import time
from pathlib import Path

from otad.fsutil import atomic_write_bytes, fsync_dir, make_dirs

MAX_EVENTS = 10_000  # beyond this the oldest are dropped: events are small, the disk is not infinite


class Outbox:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "outbox"
        make_dirs(self.dir)

    def _sequence_numbers(self) -> list[int]:
        return sorted(int(p.stem) for p in self.dir.glob("*.json") if p.stem.isdigit())

    def add(self, event: str, version: str | None, detail: str = "", rollout: dict | None = None) -> None:
        """`rollout`: {"rollout_id", "phase"} when a signed rollout plan assigned the install."""
        # otad-robot and otadctl may both add events: the counter file under a lock
        # gives each event its own number, never reused even once the outbox is empty.
        with open(self.dir / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            numbers = self._sequence_numbers()
            try:
                stored = int((self.dir / ".next").read_text())
            except (OSError, ValueError):
                stored = 1
            seq = max(stored, numbers[-1] + 1 if numbers else 1)
            doc = {"seq": seq, "event": event, "version": version, "detail": detail[:2000], "ts": time.time()}
            if rollout is not None:
                doc["rollout_id"], doc["phase"] = rollout["rollout_id"], rollout["phase"]
            atomic_write_bytes(self.dir / f"{seq:012d}.json", json.dumps(doc).encode())
            atomic_write_bytes(self.dir / ".next", str(seq + 1).encode())
            for old in numbers[: max(0, len(numbers) + 1 - MAX_EVENTS)]:
                (self.dir / f"{old:012d}.json").unlink(missing_ok=True)

    def pending(self) -> list[dict]:
        events = []
        for seq in self._sequence_numbers():
            try:
                events.append(json.loads((self.dir / f"{seq:012d}.json").read_bytes()))
            except (OSError, ValueError):
                continue
        return events

    def remove(self, seq: int) -> None:
        (self.dir / f"{seq:012d}.json").unlink(missing_ok=True)
        fsync_dir(self.dir)
