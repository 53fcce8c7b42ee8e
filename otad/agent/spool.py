"""The agent's bounded durable spool: SQLite (WAL, synchronous=FULL), rows sent in id order.

- `seq` is per (robot, boot): a counter row updated in the same transaction as
  the insert, so a `kill -9` can neither reuse nor skip a number. It is never
  below CLOCK_BOOTTIME in microseconds: that clock starts with the boot, never
  steps back (unlike the wall clock) and is the same for every process and
  container of the boot, so a spool that is new in the middle of a boot (deleted,
  STATE_DIR changed, container recreated, a damaged spool set aside, an old copy
  restored) still numbers above every seq an earlier spool handed out: each of
  those took far longer than a microsecond. The gateway and the dashboard key
  records by (robot_id, boot_id, seq) and need no other id.
- Outbox events are drained idempotently: an event's stored record and a key
  (a hash of the event file's content) commit together, then the file is
  removed. A crash in between finds the key and only removes the file. A key
  is forgotten once a directory fsync made its file's removal durable, and
  then every key without a file goes, also those a power cut left behind. The
  content is the key, not the outbox seq, because an outbox seq can come
  again (an outbox whose `.next` counter file was lost starts over).
- Bound: past `max_bytes` of pages in use, the oldest metric rows are dropped
  (never events, never rows of a batch being sent: the gateway may hold them
  already) down to 90% of the bound; in the same transaction a `dropped` record
  saying how many is spooled, so the dashboard counts the loss exactly.
  A record the gateway refuses for good is reported the same way.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
from pathlib import Path

from otad.agent.collect import rfc3339
from otad.dbutil import transaction
from otad.errors import OtadError
from otad.fsutil import fsync_dir, make_dirs
from otad.robot.outbox import Outbox
from otad.telemetry.records import MAX_RECORDS, RecordError, encode, validate_record

log = logging.getLogger("otad.agent")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (robot_id TEXT NOT NULL, boot_id TEXT NOT NULL,
    last_seq INTEGER NOT NULL, issued INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (robot_id, boot_id));
CREATE TABLE IF NOT EXISTS drained (key TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
TRIM_TO = 0.9  # trimming to below the bound, not just to it, keeps drop log lines rare


def boot_clock_us() -> int:
    """Microseconds since this boot: the floor of every seq (see the module docstring)."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1000


def checked(record: dict, what: str) -> dict | None:
    """The record as validate_record cleans it, or None (logged) if it cannot be sent.

    A version the gateway would refuse (a rejected manifest may carry anything)
    is blanked rather than losing the whole record.
    """
    try:
        return validate_record({**record, "seq": 1}, what)
    except RecordError as exc:
        if "'version'" not in str(exc) or not record.get("version"):
            log.error("%s dropped, the gateway would refuse it: %s", what, exc)
            return None
    log.warning("%s: version %r is not sendable; sending it with an empty version",
                what, str(record.get("version"))[:70])
    return checked({**record, "version": ""}, what)


def event_record(event: dict, robot_id: str, boot_id: str) -> dict:
    stamp = event.get("ts")
    rollout = {k: event[k] for k in ("rollout_id", "phase") if k in event}  # Wire 3: only on rollout installs
    return {**rollout,
        "robot_id": robot_id,
        "boot_id": boot_id,
        "ts": rfc3339(stamp if isinstance(stamp, (int, float)) and not isinstance(stamp, bool) else time.time()),
        "type": "event",
        "event": event.get("event"),
        "version": event.get("version") or "",
        "detail": event.get("detail") or "",
    }


def event_key(event: dict) -> str:
    """The key that marks an outbox event as stored (its content: see the module docstring)."""
    return hashlib.sha256(json.dumps(event, sort_keys=True).encode()).hexdigest()


class Spool:
    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        make_dirs(path.parent)
        try:
            self._db = self._open(fresh=not path.exists())
        except sqlite3.OperationalError:
            raise  # locked, unreadable, disk full: not a reason to set the data aside
        except sqlite3.DatabaseError as exc:  # not a database, or a damaged one
            self._db = self._recreate(str(exc))
        self.pending = self._db.execute("SELECT count(*) FROM records").fetchone()[0]
        # Rows up to here may be at the gateway without our having seen its 200: the bound
        # keeps them (it would count delivered rows as dropped). The last process may have
        # sent any of the oldest MAX_RECORDS (the largest batch) before it stopped.
        oldest = self._db.execute("SELECT id FROM records ORDER BY id LIMIT ?", (MAX_RECORDS,)).fetchall()
        self.offered_up_to = oldest[-1][0] if oldest else 0
        self.dropped = 0  # metrics the bound dropped, since start
        self.refused = 0  # records the gateway refused for good, since start
        self._over_with_events = False
        self._identity: tuple[str, str] | None = None  # (robot_id, boot_id) of the last record spooled

    # -- opening ----------------------------------------------------------------
    def _open(self, fresh: bool) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        try:
            # auto_vacuum only takes effect before the first table exists: freed pages
            # must go back to the filesystem, or the file would never shrink below its peak.
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            if db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                raise OtadError(f"{self.path}: cannot switch the spool to WAL mode")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            if not fresh:
                problems = [row[0] for row in db.execute("PRAGMA quick_check")]
                if problems != ["ok"]:
                    raise sqlite3.DatabaseError("; ".join(problems[:3]))
            if "issued" not in [row[1] for row in db.execute("PRAGMA table_info(counters)")]:
                db.execute("ALTER TABLE counters ADD COLUMN issued INTEGER NOT NULL DEFAULT 0")  # a spool of 0.x
            self._limit_wal(db, self.max_bytes)
        except BaseException:
            db.close()
            raise
        return db

    def _recreate(self, reason: str) -> sqlite3.Connection:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            try:
                os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
            except FileNotFoundError:
                pass
        log.error("spool %s is damaged (%s): moved it to %s and started an empty one", self.path, reason, aside)
        # The lost counter may have handed out seq numbers in this boot already: the boot
        # clock floor in _next_seq keeps the new ones above them.
        try:
            return self._open(fresh=True)
        except sqlite3.DatabaseError as exc:
            raise OtadError(f"{self.path}: cannot create the spool: {exc}") from None

    def set_bound(self, max_bytes: int) -> None:
        with self._lock:
            self._limit_wal(self._db, max_bytes)
            self.max_bytes = max_bytes

    @staticmethod
    def _limit_wal(db: sqlite3.Connection, max_bytes: int) -> None:
        page = db.execute("PRAGMA page_size").fetchone()[0]
        # The WAL is disk too: checkpoint (and truncate it) at 5% of the bound.
        wal_pages = max(8, max_bytes // page // 20)
        db.execute(f"PRAGMA wal_autocheckpoint={wal_pages}")
        db.execute(f"PRAGMA journal_size_limit={wal_pages * page}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writing ----------------------------------------------------------------
    def _next_seq(self, robot_id: str, boot_id: str) -> int:
        row = self._db.execute(
            "SELECT last_seq FROM counters WHERE robot_id = ? AND boot_id = ?", (robot_id, boot_id)
        ).fetchone()
        if row is None:
            # A new boot: the old boots' counters are never needed again.
            self._db.execute("DELETE FROM counters WHERE robot_id = ?", (robot_id,))
            self._db.execute("INSERT INTO counters VALUES (?, ?, 0, 0)", (robot_id, boot_id))
        seq = max((row[0] if row else 0) + 1, boot_clock_us())
        self._db.execute(
            "UPDATE counters SET last_seq = ?, issued = issued + 1 WHERE robot_id = ? AND boot_id = ?",
            (seq, robot_id, boot_id),
        )
        return seq

    def _insert(self, record: dict) -> int:
        self._identity = (record["robot_id"], record["boot_id"])
        seq = self._next_seq(record["robot_id"], record["boot_id"])
        self._db.execute("INSERT INTO records (kind, body) VALUES (?, ?)", (record["type"], encode({**record, "seq": seq})))
        return seq

    def add(self, record: dict) -> int | None:
        """Store a record (without seq); return the seq it got, or None if it was invalid."""
        clean = checked(record, f"{record.get('type', 'record')} sample")
        if clean is None:
            return None
        with self._lock:
            with transaction(self._db):
                seq = self._insert(clean)
            self.pending += 1
            self._enforce_bound()
        return seq

    def drain_outbox(self, outbox: Outbox, robot_id: str, boot_id: str) -> int:
        """Move every outbox file into the spool exactly once; return how many records were added."""
        events = outbox.pending()
        if not events:
            with self._lock:
                left = self._db.execute("SELECT 1 FROM drained LIMIT 1").fetchone()
            if left:  # keys a power cut left behind their files' durable removal
                self._forget_drained(outbox, [])
            return 0
        keys = [event_key(e) for e in events]
        added = 0
        with self._lock:
            with transaction(self._db):
                for event, key in zip(events, keys):
                    if self._db.execute("SELECT 1 FROM drained WHERE key = ?", (key,)).fetchone():
                        continue  # stored before a crash that came ahead of the file's removal
                    self._db.execute("INSERT INTO drained VALUES (?)", (key,))
                    record = checked(event_record(event, robot_id, boot_id), f"outbox event {event.get('seq')}")
                    if record is not None:
                        self._insert(record)
                        added += 1
            self.pending += added
        still_there = []
        for event, key in zip(events, keys):
            try:
                outbox.remove(int(event["seq"]))
            except (OSError, KeyError, TypeError, ValueError) as exc:
                still_there.append(key)
                log.error("cannot remove outbox event %s (%s); it will not be sent twice", event.get("seq"), exc)
        self._forget_drained(outbox, still_there)
        with self._lock:
            self._enforce_bound()
        return added

    def _forget_drained(self, outbox: Outbox, still_there: list[str]) -> None:
        """Forget the keys of drained events, except those whose files could not be removed.

        A key goes only once its file's removal is durable: a file that came back after
        a power cut would otherwise be sent again. After this fsync every file missing
        from the folder is durably gone, so every other key goes, also those a power cut
        left behind after their files' removal (no file names them again).
        """
        fsync_dir(outbox.dir)
        with self._lock:
            self._db.execute("DELETE FROM drained WHERE key NOT IN (SELECT value FROM json_each(?))",
                             (json.dumps(still_there),))

    # -- sending ----------------------------------------------------------------
    def batch(self, limit: int, max_body: int) -> list[tuple[int, str]]:
        """The oldest rows, at most `limit`, whose `{"records": [...]}` body fits in `max_body`."""
        with self._lock:
            rows = self._db.execute("SELECT id, body FROM records ORDER BY id LIMIT ?", (limit,)).fetchall()
            taken, size = [], len('{"records":[]}')
            for row_id, body in rows:
                size += len(body.encode()) + 1
                if taken and size > max_body:
                    break
                taken.append((row_id, body))
            if taken:  # on their way to the gateway: the bound keeps them until acknowledged
                self.offered_up_to = max(self.offered_up_to, taken[-1][0])
        return taken

    def delete(self, ids: list[int]) -> None:
        """Forget rows the gateway has acknowledged (or that it can never accept)."""
        with self._lock:
            with transaction(self._db):
                gone = self._db.executemany("DELETE FROM records WHERE id = ?", [(i,) for i in ids]).rowcount
            self.pending -= gone
            # Sent rows free pages for good: give them back, so a drained spool is small again.
            self._db.execute("PRAGMA incremental_vacuum")

    def drop_other_robots(self, robot_id: str) -> int:
        """Forget rows spooled under another ROBOT_ID (before a reload); return how many."""
        with self._lock:
            gone = self._db.execute(
                "DELETE FROM records WHERE json_extract(body, '$.robot_id') != ?", (robot_id,)
            ).rowcount
            self.pending -= gone
        return gone

    # -- the bound --------------------------------------------------------------
    def used_bytes(self) -> int:
        def pragma(name: str) -> int:
            return self._db.execute(f"PRAGMA {name}").fetchone()[0]

        return (pragma("page_count") - pragma("freelist_count")) * pragma("page_size")

    def _enforce_bound(self) -> None:
        used = self.used_bytes()
        if used <= self.max_bytes:
            self._over_with_events = False
            return
        target, dropped = int(self.max_bytes * TRIM_TO), 0
        # The rows go and the record that counts them comes in one transaction: a crash
        # between the two would lose metrics without a trace.
        with transaction(self._db):
            while used > target:
                metrics = self._db.execute("SELECT count(*) FROM records WHERE kind = 'metric' AND id > ?",
                                           (self.offered_up_to,)).fetchone()[0]
                if metrics == 0:
                    if not self._over_with_events:
                        log.warning("spool holds %d bytes, over its bound, in events and records being sent alone; "
                                    "those are never dropped", used)
                    self._over_with_events = True
                    break
                per_row = used / max(1, self.pending - dropped)
                count = min(metrics, max(1, math.ceil((used - target) / per_row)))
                self._db.execute(
                    "DELETE FROM records WHERE id IN (SELECT id FROM records WHERE kind = 'metric' AND id > ?"
                    " ORDER BY id LIMIT ?)", (self.offered_up_to, count),
                )
                # No vacuum here: the freed pages take the next records, so the file stays at
                # the bound instead of churning through the WAL (which is disk too).
                dropped += count
                used = self.used_bytes()
            reported = self._insert_dropped(dropped) if dropped else False
        if dropped:
            self.pending += reported - dropped
            self.dropped += dropped
            log.warning(
                "spool reached its bound of %d bytes: dropped the %d oldest metrics (%d records waiting)",
                self.max_bytes, dropped, self.pending,
            )

    def _insert_dropped(self, count: int, fallback: tuple[str, str] | None = None) -> bool:
        """Spool a `dropped` record (inside the caller's transaction) under the newest identity."""
        if self._identity is None:  # nothing spooled by this process yet: take the newest row's
            row = self._db.execute("SELECT body FROM records ORDER BY id DESC LIMIT 1").fetchone()
            body = json.loads(row[0]) if row else None
            self._identity = (body["robot_id"], body["boot_id"]) if body else fallback
        if self._identity is None:
            log.error("dropped %d records but know no robot id to report it under", count)
            return False
        robot_id, boot_id = self._identity
        self._insert({"robot_id": robot_id, "boot_id": boot_id, "ts": rfc3339(time.time()), "type": "dropped",
                      "dropped": count})
        return True

    def forget_refused(self, row_id: int, body: str) -> None:
        """Delete a row the gateway refuses for good, and spool a `dropped` record in its place.

        The loss of a `dropped` record itself is only logged: a gateway too old to know
        the type would refuse every report of it, one after the other, forever.
        """
        record = json.loads(body)
        with self._lock:
            with transaction(self._db):
                gone = self._db.execute("DELETE FROM records WHERE id = ?", (row_id,)).rowcount
                reported = bool(gone) and record.get("type") != "dropped" and self._insert_dropped(
                    1, (record["robot_id"], record["boot_id"]))
            self.pending += reported - gone
            self.refused += gone
