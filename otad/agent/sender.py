"""The sender thread: post the spool's oldest rows to the gateway, delete them only after a 200.

Order: rows go in id order, one batch at a time, and a batch is retried until
the gateway acknowledges it, so records arrive per robot in `seq` order. A
retry after a lost 200 is harmless: the gateway keys records by
(robot_id, boot_id, seq) and acknowledges a duplicate without storing it.

Failures are logged once per change of kind (unreachable, HTTP 500, 401...),
not once per retry: an outage of hours must not flood the journal.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time

import requests

from otad.agent.settings import AgentSettings
from otad.agent.spool import Spool
from otad.daemon import Heartbeat
from otad.errors import ConfigError
from otad.telemetry.records import MAX_BODY_BYTES
from otad.telemetry.tokens import check_private, read_own_token
from otad.transfer.backoff import Backoff
from otad.transfer.tls import client_tls, describe_tls_error, plain_http_warning

log = logging.getLogger("otad.agent")

IDLE_WAIT = 60.0  # with nothing to send; the collector wakes us as soon as it stores a record
BEAT_EVERY = 5.0


class Sender:
    def __init__(self, settings: AgentSettings, spool: Spool, heartbeat: Heartbeat) -> None:
        self.spool = spool
        self.heartbeat = heartbeat
        self.session = requests.Session()
        self.backoff = Backoff(base=1.0, cap=settings.backoff_max)
        self.sent = 0
        self.problem: str | None = None  # the current failure, e.g. "unreachable"; None while all is well
        self.problem_since: float | None = None
        self._single_until = 0  # after a 400: rows up to this id go one by one, to find the bad one
        self._wake = threading.Event()
        self._retry_now = False
        self._backing_off = False  # set by a failed attempt: new records then do not cut the wait
        self._stop = False
        self.token = read_own_token(settings.token_file)  # ConfigError at start: exit 1 naming the file
        warning = check_private(settings.token_file)
        if warning:
            log.warning("%s", warning)
        self.settings = settings
        # Per request: requests lets $REQUESTS_CA_BUNDLE override a session's `verify`.
        self.tls_options = client_tls(settings, "gateway_ca_file").session_options()
        if warning := plain_http_warning(settings.gateway_url, "GATEWAY_URL"):
            log.warning("%s", warning)

    def apply(self, settings: AgentSettings) -> None:
        try:
            self.token = read_own_token(settings.token_file)
        except ConfigError as exc:
            log.error("%s; keeping the token read before", exc)
        self.settings = settings
        self.tls_options = client_tls(settings, "gateway_ca_file").session_options()
        self.backoff.cap = settings.backoff_max
        self.retry_now()

    def notify(self) -> None:
        """New rows are in the spool (ignored while backing off: a new record does not fix the gateway)."""
        self._wake.set()

    def retry_now(self) -> None:
        self._retry_now = True
        self._wake.set()

    def stop(self) -> None:
        self._stop = True
        self.retry_now()

    def run(self) -> None:
        while not self._stop:
            self.heartbeat.beat()
            self._backing_off = False
            try:
                delay = self.send_once()
            except (OSError, sqlite3.Error) as exc:
                # The spool's disk is full or failing: keep the thread, try again later.
                log.error("cannot read or update the spool: %s: %s", type(exc).__name__, exc)
                self._backing_off = True
                delay = self.backoff.failure()
            self._sleep(delay, interruptible=not self._backing_off)
        self.session.close()

    def _sleep(self, delay: float, interruptible: bool) -> None:
        deadline = time.monotonic() + delay
        while not self._stop and not self._retry_now:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            woken = self._wake.wait(min(remaining, BEAT_EVERY))
            self._wake.clear()
            self.heartbeat.beat()
            if woken and interruptible:
                return
        self._retry_now = False

    def status(self) -> str:
        text = f"sent {self.sent} records; {self.spool.pending} waiting"
        if self.spool.dropped or self.spool.refused:
            text += f"; dropped {self.spool.dropped} (spool full), {self.spool.refused} (refused)"
        if self.problem is not None and self.problem_since is not None:
            text += f" (gateway {self.problem} since {time.strftime('%H:%M', time.localtime(self.problem_since))})"
        return text

    # -- one batch ----------------------------------------------------------------
    def send_once(self) -> float:
        """Post one batch; return how long to wait before the next."""
        rows = self.spool.batch(self.settings.batch, MAX_BODY_BYTES)
        if not rows:
            return IDLE_WAIT
        if rows[0][0] > self._single_until:
            self._single_until = 0
        else:
            rows = rows[:1]
        body = ('{"records":[' + ",".join(b for _, b in rows) + "]}").encode()
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        try:
            response = self.session.post(
                f"{self.settings.gateway_url}/metrics", data=body, headers=headers,
                timeout=(self.settings.connect_timeout, self.settings.read_timeout), **self.tls_options,
            )
            detail = _error_text(response)
        except requests.exceptions.SSLError as exc:
            return self._failed("refuses TLS", f"TLS with the gateway failed ({describe_tls_error(exc) or 'SSLError'})")
        except requests.RequestException as exc:
            return self._failed("unreachable", f"gateway unreachable ({type(exc).__name__})")
        status = response.status_code
        ids = [row_id for row_id, _ in rows]
        if status == 200:
            self.spool.delete(ids)
            self.sent += len(ids)
            if self.problem is not None:
                log.info("gateway accepts records again; %d waiting", self.spool.pending)
            self.problem = self.problem_since = None
            self.backoff.success()
            return 0.0
        if status in (400, 413):
            return self._refused(rows, status, detail)
        if status == 403 and (stale := self.spool.drop_other_robots(self.settings.robot_id)):
            # Spooled under an earlier ROBOT_ID: this token can never send them.
            log.error("gateway refuses records of another robot id for our token: dropped %d spooled "
                      "before ROBOT_ID became %s", stale, self.settings.robot_id)
            return 0.0
        if status in (401, 403):
            self._reread_token()
            what = "rejects our token" if status == 401 else "refuses our ROBOT_ID for this token"
            return self._failed(f"{what} (HTTP {status})", f"gateway {what} (HTTP {status}: {detail})")
        return self._failed(f"answers HTTP {status}", f"gateway answers HTTP {status} ({detail})")

    def _refused(self, rows: list[tuple[int, str]], status: int, detail: str) -> float:
        # The gateway says our own record is invalid: a bug, not a network problem, so the
        # same bytes would be refused forever. Narrow it down to single records and drop
        # only the one refused, so one bad record neither wedges the spool nor costs a batch.
        if len(rows) > 1:
            log.error("gateway refused a batch of %d records (HTTP %d: %s); resending them one by one",
                      len(rows), status, detail)
            self._single_until = rows[-1][0]
            return 0.0
        log.error("gateway refused a record (HTTP %d: %s); dropping it: %s", status, detail, rows[0][1][:300])
        self.spool.forget_refused(*rows[0])
        return 0.0

    def _failed(self, kind: str, message: str) -> float:
        self._backing_off = True
        delay = self.backoff.failure()
        if kind != self.problem:
            log.warning("%s; %d records waiting, retrying with backoff up to %ds",
                        message, self.spool.pending, self.settings.backoff_max)
            self.problem = kind
            self.problem_since = self.problem_since or time.time()
        else:
            log.debug("%s; retrying in %.1fs", message, delay)
        return delay

    def _reread_token(self) -> None:
        """An operator who fixes the token file should not also have to reload the agent."""
        try:
            self.token = read_own_token(self.settings.token_file)
        except ConfigError:
            pass  # reported at start or at reload; the 401 itself is logged by the caller


def _error_text(response: requests.Response) -> str:
    if response.status_code == 200:
        return ""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    return str(error if error else response.text.strip() or response.reason)[:200]
