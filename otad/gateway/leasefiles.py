"""The gateway's persisted orchestration state, under STATE_DIR/orchestration/ (docs/formats.md).

- `leases.json`: the install-lease table (otad.orchestration.leases render/parse),
  written before any robot is told about a change in it;
- `installs.json`: this site's recent install durations (lease granted to release
  `committed`, what the window check expects an install to take) and the version
  each leased or queued robot asked for (which plan's budget and window apply to it).
Both are replaced atomically (fsutil: temp file, fsync, rename, fsync dir). A file
that cannot be read is an error naming it: the gateway refuses to start rather
than start with an empty table, which would grant leases already held.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from otad.errors import OtadError
from otad.fsutil import atomic_write_bytes, make_dirs
from otad.orchestration import ID
from otad.orchestration.leases import LeaseTable, LeaseTableError, parse_table
from otad.semver import MAX_VERSION_LEN
from otad.strictjson import check_depth, loads_strict

MAX_INSTALLS = 20  # the median of the last 20 committed installs
MAX_INSTALL_S = 7 * 86_400
MAX_INSTALLS_BYTES = 4 * 1024 * 1024
MAX_VERSIONS = 20_000


class OrchestrationFileError(OtadError):
    """An orchestration file is unreadable or not well formed (one line naming the file)."""


@dataclass
class Installs:
    durations: list[float] = field(default_factory=list)  # seconds, oldest first, at most MAX_INSTALLS
    versions: dict[str, str] = field(default_factory=dict)  # robot -> the version it asked a lease for

    def add(self, seconds: float) -> None:
        self.durations = [*self.durations, max(0.0, float(seconds))][-MAX_INSTALLS:]


class LeaseFiles:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "orchestration"
        self.leases_path = self.root / "leases.json"
        self.installs_path = self.root / "installs.json"

    def load_table(self) -> LeaseTable:
        """A missing file is a gateway that never granted a lease; anything unreadable is an error."""
        try:
            data = self.leases_path.read_bytes()
        except FileNotFoundError:
            return LeaseTable()
        except OSError as exc:
            raise OrchestrationFileError(f"cannot read {self.leases_path}: {exc.strerror}") from None
        try:
            return parse_table(data)
        except LeaseTableError as exc:
            raise OrchestrationFileError(f"{self.leases_path}: {exc}; the gateway does not start with an "
                                         "unknown lease table (move the file away to forget every lease)") from None

    def save_table(self, table: LeaseTable) -> None:
        self._write(self.leases_path, table.render() + b"\n")

    def load_installs(self) -> Installs:
        try:
            data = self.installs_path.read_bytes()
        except FileNotFoundError:
            return Installs()
        except OSError as exc:
            raise OrchestrationFileError(f"cannot read {self.installs_path}: {exc.strerror}") from None
        try:
            return _parse_installs(data)
        except OrchestrationFileError as exc:
            raise OrchestrationFileError(f"{self.installs_path}: {exc}") from None

    def save_installs(self, installs: Installs) -> None:
        doc = {"schema": 1, "durations": installs.durations, "versions": dict(sorted(installs.versions.items()))}
        self._write(self.installs_path, json.dumps(doc, sort_keys=True, allow_nan=False).encode() + b"\n")

    def _write(self, path: Path, data: bytes) -> None:
        try:
            make_dirs(self.root)
            atomic_write_bytes(path, data)
        except OSError as exc:
            raise OrchestrationFileError(f"cannot write {path}: {exc.strerror or exc}") from None


def _parse_installs(data: bytes) -> Installs:
    if len(data) > MAX_INSTALLS_BYTES:
        raise OrchestrationFileError(f"installs file is larger than {MAX_INSTALLS_BYTES} bytes")
    check_depth(data, 2, OrchestrationFileError, "installs file")
    doc = loads_strict(data, OrchestrationFileError, "installs file")
    if not isinstance(doc, dict) or set(doc) != {"schema", "durations", "versions"} or doc["schema"] != 1:
        raise OrchestrationFileError("installs file is not a schema 1 object with 'durations' and 'versions'")
    durations, versions = doc["durations"], doc["versions"]
    if not isinstance(durations, list) or len(durations) > MAX_INSTALLS or not all(
            type(d) in (int, float) and 0 <= d <= MAX_INSTALL_S for d in durations):
        raise OrchestrationFileError(f"installs file field 'durations' must list at most {MAX_INSTALLS} times in seconds")
    if not isinstance(versions, dict) or len(versions) > MAX_VERSIONS or not all(
            ID.fullmatch(r) and isinstance(v, str) and 0 < len(v) <= MAX_VERSION_LEN for r, v in versions.items()):
        raise OrchestrationFileError("installs file field 'versions' must map robot ids to versions")
    return Installs([float(d) for d in durations], dict(versions))
