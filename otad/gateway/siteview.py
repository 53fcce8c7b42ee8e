"""The site view's sender (issue 16): the orchestrator's snapshot to the dashboard.

The sync thread calls `send` after each poll that reached the dashboard. The
snapshot (`snapshot(now)`, the orchestrator's, given as a callable so this module
knows nothing of its internals) goes to `POST /sites/orchestration` with the
gateway's token when it changed (its `at` aside) or SITE_VIEW_EVERY_S passed since
the last attempt, so the dashboard can tell a quiet site from an unreachable one.
Nothing is sent while the dashboard is unreachable. Every failure is one log line
per problem, and nothing here raises: the release sync goes on whatever happens.
Format: docs/formats.md, "Site orchestration snapshot (gateway -> dashboard)".
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

from otad.errors import TransportError
from otad.orchestration.snapshot import MAX_SNAPSHOT_BYTES, render_snapshot
from otad.transfer.client import HttpClient

log = logging.getLogger("otad.gateway")
SITE_VIEW_PATH = "/sites/orchestration"
SITE_VIEW_EVERY_S = 60.0


class SiteViewSender:
    def __init__(self, snapshot: Callable[[float], dict]) -> None:
        self.snapshot = snapshot
        self._last: tuple[str, float] | None = None  # (digest without `at`, and of the token; monotonic time) of the last attempt
        self._problem: str | None = None

    def send(self, client: HttpClient, token: str | None, now: float) -> None:
        """Send the snapshot at `now` if it is due; never raises."""
        try:
            doc = self.snapshot(now)
            digest = hashlib.sha256(render_snapshot({k: v for k, v in doc.items() if k != "at"})).hexdigest()
            body = render_snapshot(doc)
        except Exception as exc:  # a fault in the snapshot must not stop the release sync
            self._report(f"cannot take the site's snapshot: {type(exc).__name__}: {exc}")
            return
        digest += f"/{hashlib.sha256((token or '').encode()).hexdigest()}"  # a new token (SIGHUP) is worth a try at once
        if self._last is not None and self._last[0] == digest and time.monotonic() - self._last[1] < SITE_VIEW_EVERY_S:
            return
        self._last = (digest, time.monotonic())
        if token is None:
            self._report("not sent: TOKEN_FILE is not set")
            return
        if len(body) > MAX_SNAPSHOT_BYTES:
            self._report(f"not sent: the snapshot is {len(body)} bytes, more than the dashboard takes ({MAX_SNAPSHOT_BYTES})")
            return
        try:
            status, reply = client.post(SITE_VIEW_PATH, body, {"Authorization": f"Bearer {token}",
                                                               "Content-Type": "application/json"})
        except TransportError as exc:
            self._report(f"not sent, retrying: {exc}")
            return
        if status != 200:
            error = reply.get("error") if isinstance(reply, dict) else None
            self._report(f"the dashboard refused it (HTTP {status}{': ' + str(error)[:200] if error else ''}); "
                         f"sent again when it changes or in {SITE_VIEW_EVERY_S:.0f}s")
            return
        if self._problem is not None:
            log.info("site view: sent to the dashboard")
        self._problem = None

    def _report(self, reason: str) -> None:
        if reason != self._problem:
            log.warning("site view: %s", reason)
        self._problem = reason
