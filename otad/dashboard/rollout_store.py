"""Rollout plans, their revisions, rollout events, site reports and site views: the store's rollout half.

`RolloutStore` is the interface the dashboard's rollout desk (rollouts.py) needs;
`SqliteRolloutTables` is its SQLite implementation, mixed into
SqliteTelemetryStore so both halves share one database file and its
connections (the tables' SQL is SQLite's; a server database gets its own
class). A revision is written once, in one transaction that checks it is
the next one: a revision number is never stored twice with other bytes, and
what the dashboard answered or served was committed first (synchronous=FULL).
"""
from __future__ import annotations

import sqlite3
import time
from dataclasses import astuple, dataclass
from typing import Protocol

from otad.errors import OtadError
from otad.rollout.progress import EVENT_KINDS, Attempt

ROLLOUT_SCHEMA = """
-- Staged rollouts (issue 15): every signed revision, never changed once written.
CREATE TABLE IF NOT EXISTS rollout_revisions (
    rollout_id TEXT NOT NULL,
    revision INTEGER NOT NULL,
    state TEXT NOT NULL,
    expires REAL NOT NULL,
    plan BLOB NOT NULL,
    bundle BLOB NOT NULL,
    issued REAL NOT NULL,
    actor TEXT NOT NULL,
    halt_phase INTEGER,
    PRIMARY KEY (rollout_id, revision)
);
-- Update events that name a rollout, copied out of `records` at ingest (same transaction).
CREATE TABLE IF NOT EXISTS rollout_events (
    rollout_id TEXT NOT NULL,
    phase INTEGER NOT NULL,
    robot_id TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    event TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS rollout_events_by_rollout ON rollout_events (rollout_id);
CREATE TABLE IF NOT EXISTS rollout_site_reports (
    rollout_id TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    revision INTEGER NOT NULL,
    body TEXT NOT NULL,
    received REAL NOT NULL,
    PRIMARY KEY (rollout_id, gateway_id)
);
-- Site orchestration (issue 16): each site's latest snapshot (otad/orchestration/snapshot.py), replaced on each report.
CREATE TABLE IF NOT EXISTS site_views (
    gateway_id TEXT PRIMARY KEY,
    at REAL NOT NULL,
    received REAL NOT NULL,
    body TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class StoredRevision:
    """One signed plan revision as the store keeps it."""

    rollout_id: str
    revision: int
    state: str
    expires: float  # epoch seconds
    plan: bytes  # canonical plan bytes
    bundle: bytes  # its Sigstore bundle
    issued: float
    actor: str  # "operator <id>" or "fleet halt"
    halt_phase: int | None = None  # the phase whose fleet criteria a "fleet halt" revision answers


class RevisionConflict(OtadError):
    """Another revision of this rollout was stored meanwhile (or the rollout already exists)."""


class RolloutStore(Protocol):
    def add_revision(self, revision: StoredRevision) -> None:
        """Store the next revision atomically: only if the rollout's highest held revision is
        revision - 1 (none for 1), else RevisionConflict. The same revision with the same
        bytes again is a no-op; a revision number is never stored twice with other bytes."""

    def latest_revision(self, rollout_id: str) -> StoredRevision | None: ...

    def latest_revisions(self) -> list[StoredRevision]:
        """The highest revision of every rollout, ordered by rollout_id."""

    def revisions(self, rollout_id: str) -> list[StoredRevision]:
        """Every revision of one rollout, oldest first."""

    def rollout_attempts(self, rollout_id: str, since: float = 0.0) -> list[Attempt]:
        """The update events naming it (of progress.EVENT_KINDS) grouped per robot, site and phase,
        as progress.attempts groups them: one row per robot and phase, not one per event, because
        the rollout view and the fleet-wide halt check read this on every request and check.
        `since`: only events from then on (the plan's halt_since, for the halt check)."""

    def robot_versions(self) -> list[dict]:
        """{"robot_id", "gateway_id", "version"} of every robot the dashboard has heard of."""

    def put_site_report(self, rollout_id: str, gateway_id: str, revision: int, body: str) -> None:
        """Keep a site's latest report on a rollout (replacing the one before)."""

    def site_reports(self, rollout_id: str) -> list[dict]:
        """{"gateway_id", "revision", "body", "received"} per site, ordered by site."""

    def put_site_view(self, gateway_id: str, at: float, body: str) -> None:
        """Keep a site's latest orchestration snapshot (`at`: the gateway's time of it), replacing the one before."""

    def site_views(self) -> list[dict]:
        """{"gateway_id", "at", "received", "body"} of every site, ordered by site: one query, for /status."""


class SqliteRolloutTables:
    """The SQLite half; the host class provides `_db()` (a per-thread connection)."""

    def _db(self) -> sqlite3.Connection:
        raise NotImplementedError

    def add_revision(self, revision: StoredRevision) -> None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")  # the check and the insert as one step against concurrent writers
        try:
            held = db.execute("SELECT plan FROM rollout_revisions WHERE rollout_id = ? AND revision = ?",
                              (revision.rollout_id, revision.revision)).fetchone()
            if held is not None:
                db.execute("ROLLBACK")
                if bytes(held[0]) == revision.plan:
                    return
                raise RevisionConflict(f"rollout {revision.rollout_id} revision {revision.revision} was issued meanwhile; "
                                       "look at its status and try again")
            highest = db.execute("SELECT MAX(revision) FROM rollout_revisions WHERE rollout_id = ?",
                                 (revision.rollout_id,)).fetchone()[0] or 0
            if highest != revision.revision - 1:
                db.execute("ROLLBACK")
                raise RevisionConflict(f"rollout {revision.rollout_id} is at revision {highest}, "
                                       f"not {revision.revision - 1}")
            db.execute("INSERT INTO rollout_revisions (rollout_id, revision, state, expires, plan, bundle, issued, actor,"
                       " halt_phase) VALUES (?,?,?,?,?,?,?,?,?)", astuple(revision))
            db.execute("COMMIT")
        except sqlite3.Error:
            if db.in_transaction:  # SQLite rolls back by itself on an I/O error or a full disk
                db.execute("ROLLBACK")
            raise

    def latest_revision(self, rollout_id: str) -> StoredRevision | None:
        row = self._db().execute("SELECT * FROM rollout_revisions WHERE rollout_id = ? ORDER BY revision DESC LIMIT 1",
                                 (rollout_id,)).fetchone()
        return _revision(row) if row is not None else None

    def latest_revisions(self) -> list[StoredRevision]:
        rows = self._db().execute(
            "SELECT r.* FROM rollout_revisions r JOIN (SELECT rollout_id, MAX(revision) AS top FROM rollout_revisions"
            " GROUP BY rollout_id) l ON r.rollout_id = l.rollout_id AND r.revision = l.top ORDER BY r.rollout_id")
        return [_revision(row) for row in rows]

    def revisions(self, rollout_id: str) -> list[StoredRevision]:
        rows = self._db().execute("SELECT * FROM rollout_revisions WHERE rollout_id = ? ORDER BY revision", (rollout_id,))
        return [_revision(row) for row in rows]

    def rollout_attempts(self, rollout_id: str, since: float = 0.0) -> list[Attempt]:
        # Grouped in SQLite: a robot's few events become one row before Python sees them. Event names
        # are validated words (otad/telemetry/records.py EVENTS), so a comma separates them safely.
        rows = self._db().execute(
            "SELECT robot_id, gateway_id, phase, group_concat(DISTINCT event), MIN(at) FROM rollout_events"
            f" WHERE rollout_id = ? AND at >= ? AND event IN ({','.join('?' * len(EVENT_KINDS))})"
            " GROUP BY gateway_id, robot_id, phase", (rollout_id, since, *EVENT_KINDS))
        return [Attempt(robot, site, phase, frozenset(names.split(",")), first) for robot, site, phase, names, first in rows]

    def robot_versions(self) -> list[dict]:
        return [dict(row) for row in self._db().execute("SELECT robot_id, gateway_id, version FROM robots")]

    def put_site_report(self, rollout_id: str, gateway_id: str, revision: int, body: str) -> None:
        self._db().execute(
            "INSERT INTO rollout_site_reports (rollout_id, gateway_id, revision, body, received) VALUES (?,?,?,?,?)"
            " ON CONFLICT DO UPDATE SET revision=excluded.revision, body=excluded.body, received=excluded.received",
            (rollout_id, gateway_id, revision, body, time.time()))

    def site_reports(self, rollout_id: str) -> list[dict]:
        return [dict(row) for row in self._db().execute(
            "SELECT gateway_id, revision, body, received FROM rollout_site_reports WHERE rollout_id = ? ORDER BY gateway_id",
            (rollout_id,))]


    def put_site_view(self, gateway_id: str, at: float, body: str) -> None:
        self._db().execute(
            "INSERT INTO site_views (gateway_id, at, received, body) VALUES (?,?,?,?)"
            " ON CONFLICT DO UPDATE SET at=excluded.at, received=excluded.received, body=excluded.body",
            (gateway_id, at, time.time(), body))

    def site_views(self) -> list[dict]:
        return [dict(row) for row in self._db().execute(
            "SELECT gateway_id, at, received, body FROM site_views ORDER BY gateway_id")]


def _revision(row: sqlite3.Row) -> StoredRevision:
    return StoredRevision(row["rollout_id"], row["revision"], row["state"], row["expires"], bytes(row["plan"]),
                          bytes(row["bundle"]), row["issued"], row["actor"], row["halt_phase"])
