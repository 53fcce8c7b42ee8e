"""The gateway's anti-rollback floor: the highest version it has verified, kept on disk.

`STATE_DIR/release-floor.json` holds `{"highest": "2.0.0", "newest_created":
"2026-12-01T10:00:00Z"}`: the floor (what `otad.trust.rollback.decide_install`
compares a new manifest with) and the `created` time of the newest manifest the
gateway accepted (what an `allow_downgrade` manifest must not be older than).
It lives beside the cache, not in it, so clearing the cache does not lower it.
It is written, atomically and fsynced, before the cache's manifest.json names
the new release, so after a crash or power cut the floor is never below what
is served. A missing file (a gateway upgraded from an otad without it) starts
from the release being served; an unreadable one too, with a warning.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from otad.errors import MalformedMetadata, OtadError
from otad.fsutil import atomic_write_bytes, make_dirs
from otad.semver import Version
from otad.trust.manifest import Manifest, timestamp_epoch, utc_timestamp
from otad.trust.rollback import next_floor

log = logging.getLogger("otad.gateway")
FLOOR_FILE = "release-floor.json"


@dataclass(frozen=True)
class Floor:
    highest: str | None = None
    newest_created: float | None = None  # epoch seconds

    def after(self, manifest: Manifest, downgrade: bool) -> "Floor":
        """The floor once `manifest` is accepted (an authorised downgrade lowers it)."""
        created = manifest.created_epoch
        newest = created if self.newest_created is None else max(self.newest_created, created)
        return Floor(next_floor(self.highest, manifest.version, downgrade), newest)


class FloorStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FLOOR_FILE

    def load(self, active: Manifest | None) -> Floor:
        """The persisted floor, never below the release being served."""
        serving = Floor(active.version, active.created_epoch) if active is not None else Floor()
        try:
            floor = _parse(self.path.read_bytes())
        except FileNotFoundError:
            return serving
        except (OSError, ValueError, MalformedMetadata) as exc:
            log.warning("%s is unreadable (%s); the anti-rollback floor starts again from app %s", self.path, exc,
                        active.version if active else "none")
            return serving
        if active is not None and (floor.highest is None or Version(active.version) > Version(floor.highest)):
            floor = Floor(active.version, floor.newest_created)
        return floor

    def save(self, floor: Floor) -> None:
        doc = {"highest": floor.highest,
               "newest_created": utc_timestamp(floor.newest_created) if floor.newest_created is not None else None}
        try:
            make_dirs(self.path.parent)
            atomic_write_bytes(self.path, (json.dumps(doc) + "\n").encode())
        except OSError as exc:  # e.g. disk full: the release is not installed, and is tried again
            raise OtadError(f"cannot write {self.path}: {exc}") from None


def _parse(data: bytes) -> Floor:
    doc = json.loads(data)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    highest, created = doc.get("highest"), doc.get("newest_created")
    if highest is not None:
        Version(highest)
    epoch = None
    if created is not None:
        if not isinstance(created, str):
            raise ValueError("newest_created is not a timestamp")
        epoch = timestamp_epoch(created)
    return Floor(highest, epoch)
