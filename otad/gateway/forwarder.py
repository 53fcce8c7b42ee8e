"""Store-and-forward: send the buffered telemetry to the dashboard, in id order.

Batches of at most FORWARD_BATCH rows and within the dashboard's size limits,
gzip-compressed, with the gateway's own bearer token. The dashboard answers
with the highest id it holds; rows up to it are deleted. A 4xx that names a
row (a record the dashboard refuses, e.g. an event type it does not know yet)
moves that row into the quarantine table and the rest flows on; a 409
buffer_reused (the dashboard holds different records under these row ids: the
buffer was restored or cloned) makes the buffer take a new buffer_id. While the WAN or the dashboard is down the rows stay in
SQLite and the forwarder backs off (exponentially, with jitter, capped); after
a restart it simply resumes from the database.
"""
from __future__ import annotations

import gzip
import json
import logging
import threading
import time

from otad.daemon import Heartbeat
from otad.dashboard.ingest import MAX_JSON_BYTES, MAX_WIRE_BYTES
from otad.errors import TransportError
from otad.gateway.buffer import TelemetryBuffer
from otad.transfer.backoff import Backoff
from otad.transfer.client import HttpClient, TransferLimits
from otad.transfer.tls import ClientTls

log = logging.getLogger("otad.gateway")
# Below the dashboard's limits, with room for the envelope; a dashboard with lower limits answers
# 413 and the batch is halved (a single row it refuses as too large is quarantined).
JSON_BUDGET = MAX_JSON_BYTES * 9 // 10
WIRE_BUDGET = MAX_WIRE_BYTES * 9 // 10


class Forwarder:
    def __init__(self, buffer: TelemetryBuffer, heartbeat: Heartbeat) -> None:
        self.buffer = buffer
        self.heartbeat = heartbeat
        self.token: str | None = None
        self.down_since: float | None = None
        self.sent = 0
        self._backoff = Backoff()
        self._stop = False
        self._wake = threading.Event()
        self._last_error = ""

    def configure(self, dashboard_url: str, gateway_id: str, token: str | None, batch: int, backoff_max: int,
                  limits: TransferLimits, tls: ClientTls | None = None) -> None:
        self.gateway_id, self.token, self.batch = gateway_id, token, batch
        self._limit = batch
        self._backoff.cap = backoff_max
        old = getattr(self, "client", None)
        self.client = HttpClient(dashboard_url, limits, tls=tls)
        if old is not None:
            old.close()
        self.buffer.new_records.set()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self.buffer.new_records.set()

    def run(self) -> None:
        while not self._stop:
            self.heartbeat.beat()
            delay = self.forward_once()
            if delay is None:  # nothing to send: wait for new records (or a periodic look)
                self.buffer.new_records.wait(1.0)
                self.buffer.new_records.clear()
            elif delay > 0:  # backing off: new records must not cut the pause short
                self._wake.wait(delay)

    def forward_once(self) -> float | None:
        """Send one batch; return the pause before the next (0: at once; None: buffer empty)."""
        rows = self.buffer.pending(self._limit)
        if not rows:
            return None
        if self.token is None:
            return self._failed("no TOKEN_FILE configured for the dashboard")
        rows = self._readable(rows)
        if not rows:
            return 0.0
        body, rows = self._encode(rows)
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json", "Content-Encoding": "gzip"}
        try:
            status, reply = self.client.post("/metrics", body, headers)
        except TransportError as exc:
            return self._failed(str(exc))
        reply = reply if isinstance(reply, dict) else {}
        acked = reply.get("acked")
        if status != 200 or not isinstance(acked, int) or isinstance(acked, bool):
            return self._refused(status, reply, rows)
        self.buffer.acknowledge(min(acked, rows[-1][0]))
        self.sent += len(rows)
        self._limit = min(self.batch, 2 * self._limit)
        if self.down_since is not None:
            log.info("telemetry: dashboard reachable again after %.0fs; flushing the backlog", time.time() - self.down_since)
        self.down_since, self._last_error = None, ""
        self._backoff.success()
        return 0.0

    def _readable(self, rows: list[tuple[int, float, str]]) -> list[tuple[int, float, str]]:
        """Rows whose body is not JSON (a damaged database) are quarantined here, not sent forever."""
        good = []
        for row in rows:
            try:
                json.loads(row[2])
            except ValueError as exc:
                self.buffer.quarantine(row[0], f"unreadable body: {exc}")
                log.error("telemetry: quarantined row %d: its body is not JSON (%s)", row[0], exc)
                break
            good.append(row)
        return good

    def _encode(self, rows: list[tuple[int, float, str]]) -> tuple[bytes, list[tuple[int, float, str]]]:
        """The gzip body for the longest prefix of `rows` within the dashboard's limits, and that prefix."""
        while True:
            payload = {
                "gateway_id": self.gateway_id,
                "buffer_id": self.buffer.buffer_id,
                "backlog": self.buffer.backlog(),
                "quarantined": self.buffer.quarantined,
                "records": [{"id": row_id, "received": received, "record": json.loads(body)} for row_id, received, body in rows],
            }
            data = json.dumps(payload, separators=(",", ":")).encode()
            body = gzip.compress(data, compresslevel=5)
            if len(rows) == 1 or (len(data) <= JSON_BUDGET and len(body) <= WIRE_BUDGET):
                return body, rows
            rows = rows[:len(rows) // 2]

    def _refused(self, status: int, reply: dict, rows: list[tuple[int, float, str]]) -> float:
        """A non-200 answer: take a new buffer_id, quarantine the named row, shrink, or back off."""
        reason = str(reply.get("error") or "")[:300]
        if status == 409 and reply.get("conflict") == "buffer_reused":
            old = self.buffer.buffer_id
            new = self.buffer.new_buffer_id()
            log.warning("telemetry: the dashboard holds other records under buffer %s (this buffer was restored from a "
                        "backup or a snapshot, or cloned): buffer reused, took new buffer_id %s; resending %d pending rows",
                        old, new, self.buffer.backlog())
            return 0.0
        row_id = reply.get("record_id")
        named = next((row for row in rows if row[0] == row_id), None) if isinstance(row_id, int) else None
        if named is None and status == 413 and len(rows) == 1:
            named = rows[0]  # one row alone is too large for this dashboard
        if named is not None and 400 <= status < 500 and status not in (401, 403, 408, 429):
            self.buffer.quarantine(named[0], f"HTTP {status}: {reason}")
            log.error("telemetry: quarantined row %d (%s): the dashboard answered HTTP %d: %s; kept in %s, table "
                      "quarantine (%d quarantined); the rest of the backlog goes on", named[0], _describe(named[2]), status,
                      reason, self.buffer.path, self.buffer.quarantined)
            return 0.0
        if status == 413:
            self._limit = max(1, len(rows) // 2)
            log.warning("telemetry: the dashboard refused %d rows as too large (%s); sending at most %d per batch",
                        len(rows), reason, self._limit)
            return 0.0
        return self._failed(f"dashboard answered HTTP {status}" + (f": {reason}" if reason else ""))

    def _failed(self, reason: str) -> float:
        delay = self._backoff.failure()
        if self.down_since is None:
            self.down_since = time.time()
        if reason != self._last_error:
            log.warning("telemetry: forwarding failed, buffering (retry in %.0fs): %s", delay, reason)
            self._last_error = reason
        return delay


def _describe(body: str) -> str:
    try:
        record = json.loads(body)
        return f"robot {record.get('robot_id')} boot {record.get('boot_id')} seq {record.get('seq')} type {record.get('type')}"
    except (ValueError, AttributeError):
        return "unreadable body"
