"""Telemetry storage behind a small interface: SQLite now, a server database later.

`TelemetryStore` is all the dashboard needs: ingest a gateway's batch
idempotently, and summarise for /status. Idempotency has two keys: the
gateway buffer's row id (a replayed batch; a buffer has its own random id,
so a gateway whose disk was replaced does not look like a replay) and the robot's (robot_id, boot_id, seq)
(the same record relayed twice, e.g. after a robot changed gateways). A
replayed batch changes nothing and is acknowledged again.

Losses are counted where they are reported, once each (a record is stored
once): a gateway's gap row adds its per-robot counts to `drops` (place
'gateway') and to the gateway's `dropped`; an agent's `dropped` record adds
to `drops` (place 'agent'). Each row names the robot and the gateway that
relayed the report.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol

from otad.telemetry.records import encode

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
CREATE INDEX IF NOT EXISTS records_robot ON records (robot_id, id);
CREATE INDEX IF NOT EXISTS records_events ON records (type, id) WHERE type != 'metric';
CREATE INDEX IF NOT EXISTS records_metric_time ON records (robot_id, received) WHERE type = 'metric';
CREATE TABLE IF NOT EXISTS gateways (
    gateway_id TEXT PRIMARY KEY,
    last_seen REAL NOT NULL,
    backlog INTEGER NOT NULL,
    dropped INTEGER NOT NULL DEFAULT 0
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
    def ingest(self, gateway_id: str, buffer_id: str, backlog: int, rows: list[dict]) -> int:
        """Store rows ({"id", "received", "record"}) once; return the highest id now held."""

    def summary(self, events: int = 50) -> dict:
        """Gateways, robots, recent events and the version distribution, for /status.

        Events are {"robot_id", "gateway_id", "ts", "received", "type", "body"}, newest first;
        `received` is when the gateway received the record (epoch seconds, the gateway's clock).
        """

    def history(self, robot_id: str, since: float) -> list[dict]:
        """A robot's metrics ({"received", "body"}) received since `since` (epoch seconds), oldest first."""

    def close(self) -> None: ...


class SqliteTelemetryStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._guard = threading.Lock()
        self._db().executescript(SCHEMA)

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

    def ingest(self, gateway_id: str, buffer_id: str, backlog: int, rows: list[dict]) -> int:
        db = self._db()
        source = f"{gateway_id}/{buffer_id}"
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            dropped = 0
            for row in rows:
                record = row["record"]
                is_gap = record["type"] == "gap"
                cursor = db.execute(
                    "INSERT OR IGNORE INTO records (gateway_id, source, gateway_row, robot_id, boot_id, seq, type, ts, received,"
                    " stored, body) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (gateway_id, source, row["id"], "" if is_gap else record["robot_id"], "gap" if is_gap else record["boot_id"],
                     record["first_id"] if is_gap else record["seq"], record["type"], record["ts"], row["received"], now,
                     encode(record)),
                )
                if not cursor.rowcount:
                    continue  # already held: a replay
                if is_gap:
                    dropped += record["dropped"]
                else:
                    self._update_robot(db, gateway_id, record, now)
                self._count_drops(db, gateway_id, record)
            db.execute(
                "INSERT INTO gateways (gateway_id, last_seen, backlog, dropped) VALUES (?,?,?,?)"
                " ON CONFLICT(gateway_id) DO UPDATE SET last_seen=excluded.last_seen, backlog=excluded.backlog,"
                " dropped=gateways.dropped + excluded.dropped",
                (gateway_id, now, max(0, backlog - len(rows)), dropped),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return max((row["id"] for row in rows), default=0)

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
        metric = record["type"] == "metric"
        db.execute(
            "INSERT INTO robots (robot_id, gateway_id, last_seen, ts, version, health, cpu, mem, boot_id, last_seq, records)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,1)"
            " ON CONFLICT(robot_id) DO UPDATE SET gateway_id=excluded.gateway_id, last_seen=excluded.last_seen,"
            " ts=excluded.ts, boot_id=excluded.boot_id, last_seq=excluded.last_seq, records=robots.records + 1,"
            " version=CASE WHEN excluded.version != '' THEN excluded.version ELSE robots.version END,"
            " health=CASE WHEN excluded.health != '' THEN excluded.health ELSE robots.health END,"
            " cpu=coalesce(excluded.cpu, robots.cpu), mem=coalesce(excluded.mem, robots.mem)",
            (record["robot_id"], gateway_id, now, record["ts"], record.get("version", "") if metric else "",
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
