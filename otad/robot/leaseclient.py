"""Wire 5 on the robot: ask the site gateway for an install lease, renew it, give it back.

Every call is one `POST /lease` (docs/formats.md "Wire 5") through the robot's one
HTTP client (otad/transfer/client.py), with the robot's token, which names the
robot to the gateway. The gateway's answer is read defensively: a field of the
wrong type or out of range makes the answer a TransportError (retried later),
never an exception that ends the worker, and its reason is cut to one printable line.

While the robot installs holding a lease, `Renewer` renews it every ttl_s/3 from
its own thread, so unpacking, swapping and a slow self-test never outlast the
lease. The thread survives any exception of a renewal (logged, tried again at
the next interval), and its early death is noticed and logged when the install ends.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from otad.errors import MalformedMetadata, TransportError
from otad.strictjson import loads_strict
from otad.transfer.client import HttpClient

log = logging.getLogger("otad.robot")
LEASE_PATH = "/lease"
STATES = ("granted", "waiting", "released", "refused", "deferred")
MAX_REASON = 200
MAX_RETRY_S = 3600
MAX_TTL_S = 86_400
MAX_ANSWER_BYTES = 4096  # a lease answer is a few fields; anything longer is not one


class LeaseUnsupported(Exception):
    """The gateway answered 404 or 405 (a gateway before Wire 5 refuses every POST but /metrics
    with 405): it predates install leases. `status` is the answer's."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


@dataclass(frozen=True)
class LeaseAnswer:
    state: str
    reason: str
    lease: int | None
    ttl_s: int | None
    ahead: int | None
    retry_s: float


def one_line(text: object, limit: int = MAX_REASON) -> str:
    """Printable ASCII, one line, at most `limit` characters: what a journal line or the wire may carry."""
    return "".join(c if " " <= c <= "~" else "?" for c in str(text)[:limit])


class LeaseClient:
    def __init__(self, client: Callable[[], HttpClient]) -> None:
        self._client = client  # the worker's current client (a SIGHUP replaces it)

    def call(self, doc: dict) -> LeaseAnswer:
        """One request; TransportError for the network, a non-200 answer or a malformed reply."""
        try:
            status, data = self._client().post_json(LEASE_PATH, doc, MAX_ANSWER_BYTES)
        except MalformedMetadata as exc:  # a hostile or broken gateway: retried like the network
            raise TransportError(str(exc)) from None
        if status in (404, 405):
            raise LeaseUnsupported(status)
        if status != 200:
            try:
                error = loads_strict(data, TransportError, "answer").get("error")
            except (TransportError, AttributeError):
                error = None
            raise TransportError(f"POST {LEASE_PATH}: HTTP {status}" + (f": {one_line(error)}" if error else ""))
        return read_answer(data)

    def request(self, version: str) -> LeaseAnswer:
        return self.call({"op": "request", "version": version})

    def renew(self, lease: int) -> LeaseAnswer:
        return self.call({"op": "renew", "lease": lease})

    def release(self, lease: int, outcome: str) -> LeaseAnswer:
        return self.call({"op": "release", "lease": lease, "outcome": outcome})

    def defer(self, reason: str, too_long: bool) -> LeaseAnswer:
        return self.call({"op": "defer", "reason": one_line(reason), "too_long": too_long})


def read_answer(data: bytes) -> LeaseAnswer:
    """The gateway's 200 answer (strict JSON: no duplicate key, no NaN), or TransportError."""
    if len(data) > MAX_ANSWER_BYTES:
        raise TransportError(f"POST {LEASE_PATH}: the answer is larger than {MAX_ANSWER_BYTES} bytes")
    return parse_answer(loads_strict(data, TransportError, f"POST {LEASE_PATH}: the gateway's answer"))


def parse_answer(reply: object) -> LeaseAnswer:
    if not isinstance(reply, dict) or reply.get("state") not in STATES:
        raise TransportError(f"POST {LEASE_PATH}: the gateway's answer is not a lease answer")

    def whole(key: str, low: int, high: int) -> int | None:
        value = reply.get(key)
        if value is None:
            return None
        if type(value) is not int or not low <= value <= high:
            raise TransportError(f"POST {LEASE_PATH}: the gateway's {key!r} is not a whole number in {low}..{high}")
        return value

    retry = reply.get("retry_s", 5)
    if type(retry) not in (int, float) or retry != retry:
        raise TransportError(f"POST {LEASE_PATH}: the gateway's 'retry_s' is not a number")
    answer = LeaseAnswer(reply["state"], one_line(reply.get("reason", "")), whole("lease", 1, 2**53),
                         whole("ttl_s", 1, MAX_TTL_S), whole("ahead", 0, 2**31), float(min(max(retry, 1), MAX_RETRY_S)))
    if answer.state == "granted" and (answer.lease is None or answer.ttl_s is None):
        raise TransportError(f"POST {LEASE_PATH}: a grant without a lease id or ttl_s")
    return answer


class Renewer:
    """Renews one held lease every ttl_s/3 until `stop()`; runs beside the install."""

    def __init__(self, leases: LeaseClient, lease: int, ttl_s: int, what: str) -> None:
        self.leases, self.lease, self.what = leases, lease, what
        self.interval = max(1.0, ttl_s / 3)
        self.renewals = 0
        self._refused = False
        self._stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"lease-{lease}", daemon=True)

    def start(self) -> "Renewer":
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            try:
                self._renew_once()
            except Exception as exc:  # a renewal's failure must not end the renewals
                log.warning("renewing lease %d (%s) failed, trying again in %.0fs: %s: %s", self.lease, self.what,
                            self.interval, type(exc).__name__, one_line(exc))

    def _renew_once(self) -> None:
        try:
            answer = self.leases.renew(self.lease)
        except LeaseUnsupported as exc:
            raise TransportError(f"the gateway no longer knows POST /lease ({exc})") from None
        if answer.state == "granted":
            self.renewals += 1
        elif not self._refused:
            # Mid-install, going on is safer than stopping mid-swap: the lease is released at the end.
            self._refused = True
            log.warning("the gateway refused to renew lease %d (%s): %s; finishing the install anyway",
                        self.lease, self.what, answer.reason)

    def stop(self, timeout: float) -> None:
        died = not self.thread.is_alive()
        self._stopping.set()
        self.thread.join(timeout)
        if died:
            log.error("the renewal thread of lease %d (%s) had died before the install ended; "
                      "the lease may have expired meanwhile", self.lease, self.what)
