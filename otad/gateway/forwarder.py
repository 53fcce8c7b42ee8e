"""Store-and-forward: send the buffered telemetry to the dashboard, in id order.

Batches of FORWARD_BATCH rows, gzip-compressed, with the gateway's own bearer
token. The dashboard answers with the highest id it has stored; rows up to
it are deleted. While the WAN or the dashboard is down the rows stay in
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
from otad.errors import TransportError
from otad.gateway.buffer import TelemetryBuffer
from otad.transfer.backoff import Backoff
from otad.transfer.client import HttpClient, TransferLimits
from otad.transfer.tls import ClientTls

log = logging.getLogger("otad.gateway")


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
        rows = self.buffer.pending(self.batch)
        if not rows:
            return None
        if self.token is None:
            return self._failed("no TOKEN_FILE configured for the dashboard")
        payload = {
            "gateway_id": self.gateway_id,
            "buffer_id": self.buffer.buffer_id,
            "backlog": self.buffer.backlog(),
            "records": [{"id": row_id, "received": received, "record": json.loads(body)} for row_id, received, body in rows],
        }
        body = gzip.compress(json.dumps(payload, separators=(",", ":")).encode(), compresslevel=5)
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json", "Content-Encoding": "gzip"}
        try:
            status, reply = self.client.post("/metrics", body, headers)
        except TransportError as exc:
            return self._failed(str(exc))
        acked = reply.get("acked") if isinstance(reply, dict) else None
        if status != 200 or not isinstance(acked, int):
            reason = reply.get("error") if isinstance(reply, dict) else None
            return self._failed(f"dashboard answered HTTP {status}" + (f": {reason}" if reason else ""))
        self.buffer.acknowledge(min(acked, rows[-1][0]))
        self.sent += len(rows)
        if self.down_since is not None:
            log.info("telemetry: dashboard reachable again after %.0fs; flushing the backlog", time.time() - self.down_since)
        self.down_since, self._last_error = None, ""
        self._backoff.success()
        return 0.0

    def _failed(self, reason: str) -> float:
        delay = self._backoff.failure()
        if self.down_since is None:
            self.down_since = time.time()
        if reason != self._last_error:
            log.warning("telemetry: forwarding failed, buffering (retry in %.0fs): %s", delay, reason)
            self._last_error = reason
        return delay
