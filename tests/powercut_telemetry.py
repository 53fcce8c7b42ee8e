"""The telemetry half of the gateway power-cut loop (tests/powercut_gateway.py).

Robots that POST like telemetry-agent (a batch resent whole until acknowledged), and the reads of
the two stores: the gateway's buffer (live, or a copy of the disk as a cut left it) and the
dashboard's store, with every sign of a record stored twice.
"""
from __future__ import annotations

import random
import shutil
import sqlite3
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Callable

import requests

from fleet import metric, post_records


class Robot(threading.Thread):
    """One robot's telemetry, sent like telemetry-agent: a batch is resent until it is acknowledged."""

    def __init__(self, url: Callable[[], str], name: str, seed: int) -> None:
        super().__init__(daemon=True, name=f"robot-{name}")
        self.url, self.robot, self.rng = url, name, random.Random(seed)
        self.next_seq = 1
        self.batch: list[dict] = []
        self.acked: set[int] = set()
        self.in_flight = False
        self.refused = 0
        self.finishing = False  # the end: no new batches, the last one resent until acknowledged
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.batch:
                if self.finishing:
                    return
                size = self.rng.choice([1, 1, 5, 20, 60])
                self.batch = [metric(self.robot, seq) for seq in range(self.next_seq, self.next_seq + size)]
                self.next_seq += size
            self.in_flight = True
            try:
                reply = post_records(self.url(), self.robot, self.batch, timeout=10)
                answer = reply.json() if reply.status_code == 200 else None
            except (requests.RequestException, ValueError):
                answer = None
            finally:
                self.in_flight = False
            if answer is not None and answer["accepted"] + answer["duplicates"] + answer["refused"] == len(self.batch):
                self.refused += answer["refused"]
                self.acked |= {record["seq"] for record in self.batch}
                self.batch = []
            self.stop.wait(self.rng.uniform(0.01, 0.1) if answer is not None else 0.2)


def buffered_records(db: Path, live: bool = False) -> set[tuple[str, int]]:
    """(robot, seq) of the records in a gateway buffer: the running gateway's (`live`, read-only),
    or, on the disk as the cut left it, those of a copy (SQLite's recovery must not change the disk)."""
    with tempfile.TemporaryDirectory() as tmp:
        if not live:
            for suffix in ("", "-wal"):
                if Path(f"{db}{suffix}").exists():
                    shutil.copyfile(f"{db}{suffix}", f"{tmp}/telemetry.db{suffix}")
            db = Path(tmp) / "telemetry.db"
        if not db.exists():
            return set()
        conn = sqlite3.connect(f"file:{db}?mode=ro" if live else db, uri=live, timeout=30)
        try:
            rows = conn.execute("SELECT robot_id, seq FROM records WHERE kind != 'gap'").fetchall()
            quarantined = conn.execute("SELECT count(*) FROM quarantine").fetchone()[0]
        except sqlite3.OperationalError:  # no tables yet: the gateway never committed its schema
            return set()
        finally:
            conn.close()
    if quarantined:
        raise AssertionError(f"{quarantined} rows quarantined")
    return {(robot, seq) for robot, seq in rows}


def dashboard_held(db: Path, robots: tuple[str, ...]) -> tuple[set[tuple[str, int]], list]:
    """(robot, seq) of the records the dashboard holds, and every sign of one stored twice."""
    if not db.exists():
        return set(), []
    # One read transaction: the rows and the counters of the same instant.
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN")
        rows = conn.execute("SELECT robot_id, boot_id, seq FROM records WHERE type != 'gap'").fetchall()
        counted = dict(conn.execute("SELECT robot_id, records FROM robots").fetchall())
        conn.execute("COMMIT")
    finally:
        conn.close()
    twice: list = sorted(row for row, n in Counter(rows).items() if n > 1)
    for robot in robots:
        rows_held = sum(1 for row in rows if row[0] == robot)
        if counted.get(robot, 0) != rows_held:
            twice.append(f"{robot}: counter {counted.get(robot, 0)}, rows {rows_held}")
    return {(robot, seq) for robot, _, seq in rows}, twice
