"""Telemetry storage behind a small interface: SQLite now, a server database later.

`TelemetryStore` is all the dashboard needs: ingest a gateway's batch
idempotently, and summarise for /status. Idempotency has two keys: the
gateway buffer's row id (a replayed batch; a buffer has its own random id,
so a gateway whose disk was replaced does not look like a replay) and the robot's (robot_id, boot_id, seq)
(the same record relayed twice, e.g. after a robot changed gateways). A
replayed batch changes nothing and is acknowledged again; a row whose key is held
with a *different* record refuses the batch (409): a restored or cloned buffer
(`buffer_reused`, the gateway takes a new buffer_id) or a reused robot seq
(`record_differs`, the gateway quarantines that row). Nothing is acknowledged
that is not held.

Losses are counted where they are reported, once each (a record is stored
once): a gateway's gap row adds its per-robot counts to `drops` (place
'gateway') and to the gateway's `dropped`; an agent's `dropped` record adds
to `drops` (place 'agent'). Each row names the robot and the gateway that
relayed the report.
"""
from __future__ import annotations

import calendar
import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol

from otad.dashboard.ingest import IngestError
from otad.dashboard.rollout_store import ROLLOUT_SCHEMA, SqliteRolloutTables
from otad.telemetry.records import encode
from otad.fsutil import make_dirs

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    gateway_id TEXT NOT NULL,
    source TEXT NOT NULL,
    gateway_row INTEGER NOT NULL,
    robot_id TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    ts TEXT NOT NULL,
    received REAL NOT NULL,
    stored REAL NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (source, gateway_row)
);
CREATE UNIQUE INDEX IF NOT EXISTS records_identity ON records (robot_id, boot_id, seq) WHERE type != 'gap';
-- records_robot (robot_id, id) was here: no query used it, and every insert paid for it.
DROP INDEX IF EXISTS records_robot;
CREATE INDEX IF NOT EXISTS records_events ON records (type, id) WHERE type != 'metric';
CREATE INDEX IF NOT EXISTS records_metric_time ON records (robot_id, received) WHERE type = 'metric';
CREATE TABLE IF NOT EXISTS gateways (
    gateway_id TEXT PRIMARY KEY,
    last_seen REAL NOT NULL,
    backlog INTEGER NOT NULL,
    dropped INTEGER NOT NULL DEFAULT 0,
    quarantined INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS drops (
    robot_id TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    place TEXT NOT NULL,
    dropped INTEGER NOT NULL,
    PRIMARY KEY (robot_id, gateway_id, place)
);
CREATE TABLE IF NOT EXISTS robots (
    robot_id TEXT PRIMARY KEY,
    gateway_id TEXT NOT NULL,
    last_seen REAL NOT NULL,
    ts TEXT NOT NULL,
    version TEXT NOT NULL DEFAULT '',
    health TEXT NOT NULL DEFAULT '',
    cpu REAL,
    mem REAL,
    boot_id TEXT NOT NULL,
    last_seq INTEGER NOT NULL,
    records INTEGER NOT NULL DEFAULT 0
);
"""


class TelemetryStore(Protocol):
    def ingest(self, gateway_id: str, buffer_id: str, backlog: int, rows: list[dict], quarantined: int = 0) -> int:
        """Store rows ({"id", "received", "record"}) once; return the highest id now held.

        Every row is then stored or held with the same content; a row whose key is held with a
        different record refuses the whole batch with IngestError 409 naming it."""

    def summary(self, events: int = 50) -> dict:
        """Gateways, robots, recent events and the version distribution, for /status.

        Events are {"robot_id", "gateway_id", "ts", "received", "type", "body"}, newest first;
        `received` is when the gateway received the record (epoch seconds, the gateway's clock).
        """

    def history(self, robot_id: str, since: float) -> list[dict]:
        """A robot's metrics ({"received", "body"}) received since `since` (epoch seconds), oldest first."""

    def close(self) -> None: ...


class SqliteTelemetryStore(SqliteRolloutTables):
    def __init__(self, path: Path) -> None:
        make_dirs(path.parent)
        self.path = path
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._guard = threading.Lock()
        db = self._db()
        db.executescript(SCHEMA)
        db.executescript(ROLLOUT_SCHEMA)
        if "quarantined" not in {row[1] for row in db.execute("PRAGMA table_info(gateways)")}:
            db.execute("ALTER TABLE gateways ADD COLUMN quarantined INTEGER NOT NULL DEFAULT 0")  # a store made before it

    def _db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
            with self._guard:
                self._connections.append(conn)
        return conn

    def close(self) -> None:
        with self._guard:
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    def ingest(self, gateway_id: str, buffer_id: str, backlog: int, rows: list[dict], quarantined: int = 0) -> int:
        db = self._db()
        source = f"{gateway_id}/{buffer_id}"
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            dropped = 0
            for row in rows:
                record = row["record"]
                is_gap = record["type"] == "gap"
                body = encode(record)
                if self._held(db, gateway_id, buffer_id, row["id"], record, body):
                    continue  # already held with the same content: a replay, or the same record relayed twice
                db.execute(
                    "INSERT INTO records (gateway_id, source, gateway_row, robot_id, boot_id, seq, type, ts, received,"
                    " stored, body) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (gateway_id, source, row["id"], "" if is_gap else record["robot_id"], "gap" if is_gap else record["boot_id"],
                     record["first_id"] if is_gap else record["seq"], record["type"], record["ts"], row["received"], now, body),
                )
                if is_gap:
                    dropped += record["dropped"]
                else:
                    self._update_robot(db, gateway_id, record, now)
                    if "rollout_id" in record:
                        db.execute("INSERT INTO rollout_events (rollout_id, phase, robot_id, gateway_id, event, at)"
                                   " VALUES (?,?,?,?,?,?)", (record["rollout_id"], record["phase"], record["robot_id"],
                                                             gateway_id, record["event"], min(now, rfc3339_epoch(record["ts"]))))
                self._count_drops(db, gateway_id, record)
            db.execute(
                "INSERT INTO gateways (gateway_id, last_seen, backlog, dropped, quarantined) VALUES (?,?,?,?,?)"
                " ON CONFLICT(gateway_id) DO UPDATE SET last_seen=excluded.last_seen, backlog=excluded.backlog,"
                " dropped=gateways.dropped + excluded.dropped, quarantined=excluded.quarantined",
                (gateway_id, now, max(0, backlog - len(rows)), dropped, quarantined),
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite rolls back by itself on an I/O error or a full disk
                db.execute("ROLLBACK")
            raise
        return max((row["id"] for row in rows), default=0)

    @staticmethod
    def _held(db: sqlite3.Connection, gateway_id: str, buffer_id: str, row_id: int, record: dict, body: str) -> bool:
        """True if this exact record is held already; a different record under either key refuses the batch (409):
        acknowledging it would make the gateway delete a record that is stored nowhere."""
        same_row = db.execute("SELECT body FROM records WHERE source = ? AND gateway_row = ?",
                              (f"{gateway_id}/{buffer_id}", row_id)).fetchone()
        if same_row is not None:
            if same_row[0] == body:
                return True
            raise IngestError(
                f"gateway {gateway_id} buffer {buffer_id} row {row_id} is already held with a different record: this buffer was "
                "restored from a backup or snapshot, or cloned; the gateway must take a new buffer_id (otad-gateway does so by "
                "itself; another sender must replace its buffer id)", 409, conflict="buffer_reused", record_id=row_id)
        if record["type"] == "gap":
            return False
        # `type != 'gap'` lets the planner use the partial index records_identity.
        same_robot = db.execute("SELECT body FROM records WHERE robot_id = ? AND boot_id = ? AND seq = ? AND type != 'gap'",
                                (record["robot_id"], record["boot_id"], record["seq"])).fetchone()
        if same_robot is None:
            return False
        if same_robot[0] == body:
            return True
        raise IngestError(
            f"robot {record['robot_id']} boot {record['boot_id']} seq {record['seq']} (gateway row {row_id}) is already held "
            "with a different record: the robot reused a seq; the gateway keeps this record in its quarantine table",
            409, conflict="record_differs", record_id=row_id)

    @staticmethod
    def _count_drops(db: sqlite3.Connection, gateway_id: str, record: dict) -> None:
        if record["type"] == "gap":
            losses = [(robot, "gateway", n) for robot, n in record.get("robots", {}).items()]
        elif record["type"] == "dropped":
            losses = [(record["robot_id"], "agent", record["dropped"])]
        else:
            return
        db.executemany(
            "INSERT INTO drops (robot_id, gateway_id, place, dropped) VALUES (?,?,?,?)"
            " ON CONFLICT DO UPDATE SET dropped = drops.dropped + excluded.dropped",
            [(robot, gateway_id, place, n) for robot, place, n in losses],
        )

    def _update_robot(self, db: sqlite3.Connection, gateway_id: str, record: dict, now: float) -> None:
        """The robot's latest state moves only forward: by seq within a boot, by the robot's own ts across boots;
        a backlog that lands late counts its records but changes nothing else. last_seen is when the robot
        reported (its ts; never in the dashboard's future), not when the record arrived."""
        metric = record["type"] == "metric"
        reported = min(now, rfc3339_epoch(record["ts"]))
        current = db.execute("SELECT boot_id, last_seq, ts FROM robots WHERE robot_id = ?", (record["robot_id"],)).fetchone()
        if current is not None and not (
                record["seq"] > current["last_seq"] if record["boot_id"] == current["boot_id"]
                else rfc3339_epoch(record["ts"]) > rfc3339_epoch(current["ts"])):
            db.execute("UPDATE robots SET records = records + 1 WHERE robot_id = ?", (record["robot_id"],))
            return
        db.execute(
            "INSERT INTO robots (robot_id, gateway_id, last_seen, ts, version, health, cpu, mem, boot_id, last_seq, records)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,1)"
            " ON CONFLICT(robot_id) DO UPDATE SET gateway_id=excluded.gateway_id, last_seen=excluded.last_seen,"
            " ts=excluded.ts, boot_id=excluded.boot_id, last_seq=excluded.last_seq, records=robots.records + 1,"
            " version=CASE WHEN excluded.version != '' THEN excluded.version ELSE robots.version END,"
            " health=CASE WHEN excluded.health != '' THEN excluded.health ELSE robots.health END,"
            " cpu=coalesce(excluded.cpu, robots.cpu), mem=coalesce(excluded.mem, robots.mem)",
            (record["robot_id"], gateway_id, reported, record["ts"], record.get("version", "") if metric else "",
             record["health"] if metric else "", record["cpu"] if metric else None, record["mem"] if metric else None,
             record["boot_id"], record["seq"]),
        )

    def summary(self, events: int = 50) -> dict:
        db = self._db()
        gateways = [dict(row) for row in db.execute("SELECT * FROM gateways ORDER BY gateway_id")]
        robots = [dict(row) for row in db.execute("SELECT * FROM robots ORDER BY gateway_id, robot_id")]
        drops: dict[tuple[str, str], int] = {}  # (robot or gateway, place) -> count
        for row in db.execute("SELECT robot_id, gateway_id, place, dropped FROM drops"):
            drops[row["robot_id"], row["place"]] = drops.get((row["robot_id"], row["place"]), 0) + row["dropped"]
            if row["place"] == "agent":
                drops[row["gateway_id"], "relayed"] = drops.get((row["gateway_id"], "relayed"), 0) + row["dropped"]
        for robot in robots:
            robot["dropped_agent"] = drops.get((robot["robot_id"], "agent"), 0)
            robot["dropped_gateway"] = drops.get((robot["robot_id"], "gateway"), 0)
        for gateway in gateways:
            gateway["dropped_agent"] = drops.get((gateway["gateway_id"], "relayed"), 0)
        recent = [
            {"robot_id": row["robot_id"], "gateway_id": row["gateway_id"], "ts": row["ts"], "received": row["received"],
             "type": row["type"], "body": row["body"]}
            for row in db.execute("SELECT robot_id, gateway_id, ts, received, type, body FROM records WHERE type != 'metric'"
                                  " ORDER BY id DESC LIMIT ?", (events,))
        ]
        versions: dict[str, int] = {}
        for robot in robots:
            versions[robot["version"] or "unknown"] = versions.get(robot["version"] or "unknown", 0) + 1
        return {"gateways": gateways, "robots": robots, "events": recent, "versions": versions}

    def history(self, robot_id: str, since: float) -> list[dict]:
        db = self._db()
        return [
            {"received": row["received"], "body": row["body"]}
            # records_metric_time: a robot's last hour without reading the rest of its history.
            for row in db.execute("SELECT received, body FROM records WHERE robot_id = ? AND type = 'metric' AND received >= ?"
                                  " ORDER BY received, id", (robot_id, since))
        ]


def rfc3339_epoch(ts: str) -> float:
    """A validated record ts (YYYY-MM-DDTHH:MM:SS[.frac]Z) in epoch seconds."""
    whole = calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S"))
    return whole + (float("0" + ts[19:-1]) if ts[19] == "." else 0.0)
