"""The gateway's telemetry buffer: SQLite as a durable queue (WAL, synchronous=FULL).

All writes go through one writer thread that commits whatever requests are
waiting in one transaction (group commit): concurrent POSTs share an fsync,
and each request's 2xx is sent only after the commit that holds its records.
`(robot_id, boot_id, seq)` is unique, so a retried record is acknowledged
without being stored twice; because a robot sends its records in `seq` order,
the highest seq stored per (robot, boot) also catches a retry that arrives
after the original was already forwarded and deleted. Ids use AUTOINCREMENT: never reused by one
database, so the dashboard can key its idempotency on (gateway, buffer_id, id); a database restored
from a backup or snapshot, or cloned, does reuse them, and then takes a new buffer_id (forwarder.py).

A record at or below that high-water mark is a retry only if it is not older
than the first record of the robot's last request that stored anything (an
agent resends its oldest unacknowledged rows, never older ones). Anything
older means the robot's seq went backwards (an agent of before this format
whose spool was lost, two robots under one id, or a resend processed after
newer records): the records are refused, logged and counted (`refused`, in
STATUS=). They are not reported as lost: in the last case they are not.

The buffer is bounded: when the database's used pages exceed the budget, the
oldest *metric* rows are dropped (never events) and a gap row records how
many, which ids and which robots lost them, so every loss is visible on the
dashboard. Rows the forwarder has read (`pending`) are never dropped: the
dashboard may already hold them, and a gap that also counted them would
report more loss than there was.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from otad.daemon import Worker
from otad.telemetry.records import encode
from otad.fsutil import make_dirs

log = logging.getLogger("otad.gateway")

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    robot_id TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    received REAL NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (robot_id, boot_id, seq)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Rows the dashboard refused by name (forwarder.py): kept, counted, out of the queue.
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY,
    robot_id TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    received REAL NOT NULL,
    body TEXT NOT NULL,
    reason TEXT NOT NULL,
    quarantined REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS high_water (
    robot_id TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    batch_from INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (robot_id, boot_id)
);
"""
DROP_CHUNK = 500
MAX_OFFERED = 1000  # the largest FORWARD_BATCH: what a previous process may have sent unacknowledged


@dataclass
class _Job:
    records: list[dict] | None = None
    ack_up_to: int | None = None
    quarantine: tuple[int, str] | None = None  # (row id, the dashboard's reason)
    new_buffer_id: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    accepted: int = 0
    duplicates: int = 0
    refused: int = 0  # seq went backwards
    error: BaseException | None = None


def wal_allowance(max_bytes: int) -> int:
    """Bytes the WAL may take: a few percent of the budget, so the files stay near it."""
    return max(32 * 1024, max_bytes // 20)


def connect(path: Path, max_bytes: int = 64 * 2**20) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    wal_bytes = wal_allowance(max_bytes)
    conn.execute(f"PRAGMA journal_size_limit={wal_bytes}")
    conn.execute(f"PRAGMA wal_autocheckpoint={max(8, wal_bytes // 4096)}")
    return conn


class TelemetryBuffer:
    def __init__(self, path: Path, max_bytes: int) -> None:
        make_dirs(path.parent)
        self.path = path
        # The database file never shrinks (freed pages are reused), so bound what it holds
        # such that file + WAL stay within max_bytes.
        self.max_bytes = int(max_bytes * 0.95) - 2 * wal_allowance(max_bytes) - 32 * 1024  # -shm index
        self._wal_limit = wal_allowance(max_bytes)
        self._wal_path = path.with_name(path.name + "-wal")
        self._db = connect(path, max_bytes)
        self._db.executescript(SCHEMA)
        if "batch_from" not in [row[1] for row in self._db.execute("PRAGMA table_info(high_water)")]:
            self._db.execute("ALTER TABLE high_water ADD COLUMN batch_from INTEGER NOT NULL DEFAULT 0")
        self._reader = connect(path, max_bytes)
        # Kept by the writer thread; read by STATUS= and the forwarder without a query.
        self.count = self._db.execute("SELECT count(*) FROM records").fetchone()[0]
        self.refused = int(self._meta("refused") or 0)
        # Rows up to here may be at the dashboard without an ack: the bound keeps them. The
        # last process may have sent any of the oldest MAX_OFFERED before it stopped.
        oldest = self._db.execute("SELECT id FROM records ORDER BY id LIMIT ?", (MAX_OFFERED,)).fetchall()
        self.offered_up_to = oldest[-1][0] if oldest else 0
        self._offer_lock = threading.Lock()  # a batch is read and offered between two drops, never during one
        # A random id per database: the dashboard keys idempotency on (gateway, buffer, row id),
        # so a gateway whose buffer was wiped (ids restarting at 1) is not mistaken for a replay.
        self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('buffer_id', lower(hex(randomblob(8))))")
        self.buffer_id = self._db.execute("SELECT value FROM meta WHERE key = 'buffer_id'").fetchone()[0]
        self.quarantined = self._db.execute("SELECT count(*) FROM quarantine").fetchone()[0]
        self._check_machine()
        self._jobs: list[_Job] = []
        self._cond = threading.Condition()
        self._stop = False
        self.new_records = threading.Event()
        self._thread = Worker("telemetry-writer", self._run, stopping=lambda: self._stop)

    def start(self) -> None:
        self._thread.start()

    @property
    def thread(self) -> Worker:
        return self._thread

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(10)
        self._db.close()
        self._reader.close()

    # -- API used by request threads and the forwarder ---------------------------------
    def append(self, records: list[dict], timeout: float = 30) -> tuple[int, int, int]:
        """Store records durably; return (accepted, duplicates, refused) once committed."""
        job = _Job(records=records)
        self._submit(job, timeout)
        return job.accepted, job.duplicates, job.refused

    def acknowledge(self, up_to: int, timeout: float = 30) -> None:
        """The dashboard holds every row with id <= up_to: delete them."""
        self._submit(_Job(ack_up_to=up_to), timeout)

    def quarantine(self, row_id: int, reason: str, timeout: float = 30) -> None:
        """Move one row the dashboard refused out of the queue, into the quarantine table."""
        self._submit(_Job(quarantine=(row_id, reason)), timeout)

    def new_buffer_id(self, timeout: float = 30) -> str:
        """Take a fresh random buffer_id: the dashboard holds other rows under these ids (a restored
        or cloned buffer). Rows not yet acknowledged are sent again under the new id."""
        self._submit(_Job(new_buffer_id=True), timeout)
        return self.buffer_id

    def _check_machine(self) -> None:
        """A buffer first opened on another machine (a cloned image that shipped telemetry.db) takes
        a new buffer_id at once; a backup or VM snapshot restored on the same machine cannot be seen
        from here: the dashboard's 409 buffer_reused answer catches those (forwarder.py)."""
        try:
            machine = Path("/etc/machine-id").read_text().strip()[:64]
        except OSError:
            return
        row = self._db.execute("SELECT value FROM meta WHERE key = 'machine_id'").fetchone()
        if row is not None and row[0] != machine:
            self._db.execute("UPDATE meta SET value = lower(hex(randomblob(8))) WHERE key = 'buffer_id'")
            old, self.buffer_id = self.buffer_id, self._db.execute("SELECT value FROM meta WHERE key = 'buffer_id'").fetchone()[0]
            log.warning("telemetry: %s was made on another machine (a cloned image?): buffer_id %s replaced by %s",
                        self.path, old, self.buffer_id)
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('machine_id', ?)", (machine,))

    def _submit(self, job: _Job, timeout: float) -> tuple[int, int]:
        with self._cond:
            if self._stop:
                raise RuntimeError("telemetry buffer is closed")
            self._jobs.append(job)
            self._cond.notify()
        if not job.done.wait(timeout):
            raise TimeoutError("telemetry commit took too long")
        if job.error is not None:
            raise job.error
        return job.accepted, job.duplicates

    def pending(self, limit: int) -> list[tuple[int, float, str]]:
        """The oldest rows, in id order: (id, received, body); the bound keeps them until acknowledged."""
        with self._offer_lock:
            rows = self._reader.execute("SELECT id, received, body FROM records ORDER BY id LIMIT ?", (limit,)).fetchall()
            if rows:
                self.offered_up_to = max(self.offered_up_to, rows[-1][0])
        return rows

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def backlog(self) -> int:
        return self.count

    # -- writer thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stop:
                    self._cond.wait()
                if not self._jobs and self._stop:
                    return
                jobs, self._jobs = self._jobs, []
            try:
                self._commit(jobs)
            except BaseException as exc:  # the requests learn of it; the writer goes on
                log.error("telemetry commit failed: %s: %s", type(exc).__name__, exc)
                for job in jobs:
                    job.error = exc
            for job in jobs:
                job.done.set()

    def _commit(self, jobs: list[_Job]) -> None:
        db = self._db
        now = time.time()
        with self._offer_lock:  # held until COMMIT: pending() must not read rows a drop is deleting
            db.execute("BEGIN IMMEDIATE")
            delta, refused, quarantined, buffer_id = 0, 0, 0, self.buffer_id
            try:
                inserted = False
                for job in jobs:
                    stored = self._store(db, job, now)
                    delta += stored
                    inserted = inserted or stored > 0
                    refused += job.refused
                    if job.ack_up_to is not None:
                        delta -= db.execute("DELETE FROM records WHERE id <= ?", (job.ack_up_to,)).rowcount
                    if job.quarantine is not None:
                        moved = db.execute(
                            "INSERT OR IGNORE INTO quarantine SELECT id, robot_id, boot_id, seq, kind, received, body, ?, ?"
                            " FROM records WHERE id = ?", (job.quarantine[1], now, job.quarantine[0])).rowcount
                        delta -= db.execute("DELETE FROM records WHERE id = ?", (job.quarantine[0],)).rowcount
                        quarantined += moved
                    if job.new_buffer_id:
                        db.execute("UPDATE meta SET value = lower(hex(randomblob(8))) WHERE key = 'buffer_id'")
                        buffer_id = db.execute("SELECT value FROM meta WHERE key = 'buffer_id'").fetchone()[0]
                if refused:
                    self.refused += refused
                    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('refused', ?)", (str(self.refused),))
                if inserted:
                    delta += self._enforce_bound(db, now)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite rolls back by itself on an I/O error or a full disk
                    db.execute("ROLLBACK")
                if refused:
                    self.refused -= refused
                raise
        self.count += delta
        self.quarantined += quarantined
        self.buffer_id = buffer_id
        if inserted or refused:
            self.new_records.set()
        self._truncate_wal()

    def _store(self, db: sqlite3.Connection, job: _Job, now: float) -> int:
        """Insert one request's new records; count its retries and refusals; return rows added."""
        added, first_seq, backwards = 0, {}, {}
        for record in job.records or ():
            key = (record["robot_id"], record["boot_id"])
            first_seq.setdefault(key, record["seq"])
            row = db.execute("SELECT seq, batch_from FROM high_water WHERE robot_id = ? AND boot_id = ?", key).fetchone()
            if row is not None and record["seq"] <= row[0]:
                if record["seq"] >= row[1] or self._held(db, key, record):
                    job.duplicates += 1  # a resend of the last request, whose answer was lost
                else:
                    backwards.setdefault(key, []).append((record["seq"], row[0]))
                continue
            db.execute(
                "INSERT INTO records (robot_id, boot_id, seq, kind, received, body) VALUES (?,?,?,?,?,?)",
                (*key, record["seq"], record["type"], now, encode(record)),
            )
            db.execute("INSERT OR REPLACE INTO high_water (robot_id, boot_id, seq, batch_from) VALUES (?,?,?,?)",
                       (*key, record["seq"], first_seq[key]))
            job.accepted += 1
            added += 1
        for (robot, boot), seqs in backwards.items():
            # Not reported as a loss: a resend that arrives after newer records (a request the
            # agent gave up on, processed late) looks the same, and its records are delivered.
            log.error("telemetry: robot %s boot %s sent seq %d, below its last seq %d: refused %d records "
                      "(an agent that lost its spool and reuses seq numbers, two robots with one id, "
                      "or a late resend)", robot, boot, seqs[0][0], seqs[0][1], len(seqs))
            job.refused += len(seqs)
        return added

    @staticmethod
    def _held(db: sqlite3.Connection, key: tuple[str, str], record: dict) -> bool:
        """The very same record is still buffered: an older resend, not a seq gone backwards."""
        row = db.execute("SELECT body FROM records WHERE robot_id = ? AND boot_id = ? AND seq = ?",
                         (*key, record["seq"])).fetchone()
        return row is not None and row[0] == encode(record)

    def _insert_gap(self, db: sqlite3.Connection, now: float, fields: dict, robots: dict[str, int]) -> None:
        """A gap row: what was lost and whose. Its seq is its own id, so gap rows never collide."""
        gap = {"type": "gap", "dropped": sum(robots.values()), "robots": robots, "ts": _rfc3339(now), **fields}
        db.execute("INSERT INTO records (robot_id, boot_id, seq, kind, received, body) VALUES ('', 'gap', -1, 'gap', ?, ?)",
                   (now, json.dumps(gap, sort_keys=True)))
        db.execute("UPDATE records SET seq = id WHERE id = last_insert_rowid()")

    def _truncate_wal(self) -> None:
        """Automatic checkpoints never shrink the WAL file; over its allowance, truncate it."""
        try:
            if self._wal_path.stat().st_size > self._wal_limit:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except (OSError, sqlite3.Error) as exc:
            log.debug("wal checkpoint skipped: %s", exc)

    def used_bytes(self, db: sqlite3.Connection | None = None) -> int:
        db = db or self._reader
        pages = db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0]
        return pages * db.execute("PRAGMA page_size").fetchone()[0]

    def _enforce_bound(self, db: sqlite3.Connection, now: float) -> int:
        """Drop the oldest metrics not offered to the dashboard until the buffer fits; return the change in row count."""
        delta = 0
        while self.used_bytes(db) > self.max_bytes:
            rows = db.execute("SELECT id, robot_id FROM records WHERE kind = 'metric' AND id > ? ORDER BY id LIMIT ?",
                              (self.offered_up_to, DROP_CHUNK)).fetchall()
            if not rows:
                log.error("telemetry buffer over its bound with events and rows in flight only; keeping them")
                return delta
            ids = [row[0] for row in rows]
            robots: dict[str, int] = {}
            for _, robot in rows:
                robots[robot] = robots.get(robot, 0) + 1
            db.execute(f"DELETE FROM records WHERE id IN ({','.join('?' * len(ids))})", ids)
            self._insert_gap(db, now, {"reason": "buffer_full", "first_id": ids[0], "last_id": ids[-1]}, robots)
            delta += 1 - len(ids)
            log.warning("telemetry buffer full: dropped %d metric records (ids %d-%d) of %s", len(ids), ids[0], ids[-1],
                        ", ".join(f"{robot} ({n})" for robot, n in sorted(robots.items())))
        return delta


def _rfc3339(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
