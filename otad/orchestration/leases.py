"""The site's install-lease table: who may be out of service now, and who waits, in what order.

A robot holds a lease from its gateway from before it stops its app until it
commits or rolls back. The table is plain data with explicit `now`: the gateway
applies one operation, persists `render()` atomically (fsutil), and only then
answers the robot, so a kill -9 at any point leaves either the old table or the
new one on disk and `parse_table` restores exactly it: no lease forgotten, none
granted twice. One lease per robot by construction (the table is keyed by
robot): a robot asking again for a lease it holds gets the same lease.

Order and fairness: `request` puts a ready robot in the queue once (asking again
keeps its place); `grant` walks the queue by (phase, arrival): an earlier
rollout phase first, first come first served within a phase. The budget and the
window decide each robot (`decide`). A robot refused for a reason of its own
(its group is full or at min_available) is passed over, so one zone cannot stall
the site, and keeps its place for the next round. Every waiter is eventually
served: leases end (release or TTL), and a robot only ever moves back when its
own lease expired (to the back of its phase's queue: it had its turn) or it
withdrew (no longer ready).

Time: a lease is expired once `now >= expires_at`, whether or not `expire` has
run yet; until `expire` removes it, it still counts against the budget (never
more out of service than the budget, even between sweeps).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from otad.errors import OtadError
from otad.orchestration import ID, Verdict
from otad.strictjson import check_depth, loads_strict

SCHEMA = 1
MAX_TABLE_BYTES = 4 * 1024 * 1024
MAX_ENTRIES = 20_000  # leases and waiters together: robots of one site
MAX_DEPTH = 3  # table > list > entry
MAX_TTL_S = 86_400
MAX_PHASE = 1_000
MAX_COUNTER = 2**53  # exact in every JSON reader
MAX_EPOCH = 2**40
# "withdrawn": the robot's final readiness check, right before it stops its app, said no; it
# gives the lease back without installing (Wire 5).
OUTCOMES = ("committed", "rolled_back", "withdrawn")


class LeaseTableError(OtadError):
    """The lease table's bytes are not a well-formed table (or an operation's input is invalid)."""


@dataclass(frozen=True)
class Lease:
    robot_id: str
    lease_id: int  # unique for the table's life, also across restarts (persisted counter)
    phase: int
    granted_at: float
    expires_at: float
    ttl_s: int
    # When its robot was last heard from (asked, renewed). A grant is not hearing from the robot:
    # it keeps the waiter's `seen`, so a robot that died is dropped by the waiting TTL even when
    # the lease TTL is shorter and it would otherwise be granted the slot again every TTL.
    # None (a table written before the field): its last renewal or the grant.
    heard: float | None = None

    @property
    def last_heard(self) -> float:
        return self.expires_at - self.ttl_s if self.heard is None else self.heard


@dataclass(frozen=True)
class Waiter:
    robot_id: str
    phase: int
    seq: int  # arrival order, unique
    since: float  # when it joined the queue
    seen: float  # when it was last heard from (stale waiters are dropped by expire); may precede `since`


@dataclass(frozen=True)
class Answer:
    """What the robot is told: `granted` (with the lease), `waiting` (with how many are ahead),
    `released`, or `refused` (with why)."""

    state: str
    reason: str
    lease: Lease | None = None
    ahead: int | None = None


@dataclass(frozen=True)
class Decision:
    robot_id: str
    verdict: Verdict
    lease: Lease | None  # the new lease when granted


Decide = Callable[[str, int, frozenset[str]], Verdict]  # (robot, phase, robots holding leases) -> verdict


class LeaseTable:
    def __init__(self) -> None:
        self.leases: dict[str, Lease] = {}
        self.queue: dict[str, Waiter] = {}
        self.next_seq = 1
        self.next_lease = 1

    # -- reading --------------------------------------------------------------------------
    def held(self) -> frozenset[str]:
        """Robots holding a lease (expired-but-unswept ones too: they may still be installing)."""
        return frozenset(self.leases)

    def order(self) -> list[Waiter]:
        """The queue in the order grant serves it."""
        return sorted(self.queue.values(), key=lambda w: (w.phase, w.seq))

    def ahead(self, robot_id: str) -> int | None:
        """How many waiters grant considers before this one; None when it is not waiting."""
        order = self.order()
        return next((n for n, w in enumerate(order) if w.robot_id == robot_id), None)

    # -- operations -----------------------------------------------------------------------
    def request(self, robot_id: str, phase: int, now: float) -> Answer:
        """A ready robot asks for a lease: the one it holds, or a place in the queue (kept if it had one)."""
        _check_robot(robot_id)
        _check_int(phase, 0, MAX_PHASE, "phase")
        expired = self._lapse(robot_id, now)
        lease = self.leases.get(robot_id)
        if lease is not None:
            lease = self.leases[robot_id] = replace(lease, heard=max(lease.last_heard, now))
            return Answer("granted", f"{robot_id} holds lease {lease.lease_id} until {lease.expires_at:.0f}", lease)
        waiter = self.queue.get(robot_id)
        if waiter is None:
            waiter = Waiter(robot_id, phase, self._seq(), now, now)
        self.queue[robot_id] = Waiter(waiter.robot_id, waiter.phase, waiter.seq, waiter.since, max(waiter.seen, now))
        ahead = self.ahead(robot_id)
        return Answer("waiting", f"{expired + '; ' if expired else ''}{robot_id} waits for a lease ({ahead} ahead)", ahead=ahead)

    def withdraw(self, robot_id: str) -> Answer:
        """A waiting robot is no longer ready (READY_CMD, inhibit file): it leaves the queue."""
        if self.queue.pop(robot_id, None) is None:
            return Answer("released", f"{robot_id} was not waiting")
        return Answer("released", f"{robot_id} left the queue (no longer ready)")

    def grant(self, now: float, ttl_s: int, decide: Decide) -> list[Decision]:
        """Serve the queue in order: each waiter `decide` allows gets a lease of `ttl_s`."""
        _check_int(ttl_s, 1, MAX_TTL_S, "ttl_s")
        decisions = []
        for waiter in self.order():
            if waiter.seen < waiter.since:
                # Put back by its lease's expiry and silent since: likely dead. It keeps its place,
                # gets a lease once it asks again, and leaves the queue by the waiting TTL if it never does.
                decisions.append(Decision(waiter.robot_id, Verdict(False, f"{waiter.robot_id} has not asked again "
                                                                          "since its lease expired"), None))
                continue
            verdict = decide(waiter.robot_id, waiter.phase, self.held())
            lease = None
            if verdict.ok:
                lease = Lease(waiter.robot_id, self._lease_id(), waiter.phase, now, now + ttl_s, ttl_s, waiter.seen)
                self.leases[waiter.robot_id] = lease
                del self.queue[waiter.robot_id]
            decisions.append(Decision(waiter.robot_id, verdict, lease))
        return decisions

    def renew(self, robot_id: str, lease_id: int, now: float) -> Answer:
        """Extend a held, unexpired lease by its TTL (while installing and through the self-test)."""
        expired = self._lapse(robot_id, now)
        lease = self.leases.get(robot_id)
        if lease is None:
            return Answer("refused", expired or f"{robot_id} holds no lease (ask again)")
        if lease.lease_id != lease_id:
            return Answer("refused", f"{robot_id} holds lease {lease.lease_id}, not {lease_id}")
        renewed = Lease(robot_id, lease_id, lease.phase, lease.granted_at, max(lease.expires_at, now + lease.ttl_s), lease.ttl_s,
                        max(lease.last_heard, now))
        self.leases[robot_id] = renewed
        return Answer("granted", f"{robot_id} renewed lease {lease_id} until {renewed.expires_at:.0f}", renewed)

    def release(self, robot_id: str, lease_id: int, outcome: str, now: float) -> Answer:
        """The robot committed, rolled back or withdrew: its lease ends (idempotent, so a retried release is fine).
        A robot whose lease already expired leaves the queue it was put back in: it is done."""
        if outcome not in OUTCOMES:
            raise LeaseTableError(f"release outcome {str(outcome)[:20]!r} is not one of {', '.join(OUTCOMES)}")
        lease = self.leases.get(robot_id)
        if lease is not None and lease.lease_id != lease_id:
            return Answer("refused", f"{robot_id} holds lease {lease.lease_id}, not {lease_id}")
        self.queue.pop(robot_id, None)
        if lease is None:
            return Answer("released", f"{robot_id} holds no lease {lease_id} (released or expired before): {outcome}")
        del self.leases[robot_id]
        late = f", {now - lease.expires_at:.0f}s after it expired" if now >= lease.expires_at else ""
        return Answer("released", f"{robot_id} released lease {lease_id}: {outcome}{late}")

    def expire(self, now: float, waiting_ttl_s: float | None = None) -> list[str]:
        """Sweep: leases past their TTL end and their robots go to the back of their phase's queue;
        waiters that have not asked within `waiting_ttl_s` leave it. One log line per change."""
        lines = [self._lapse(robot, now) for robot in sorted(self.leases, key=lambda r: self.leases[r].lease_id)]
        lines = [line for line in lines if line]
        if waiting_ttl_s is not None:
            for waiter in self.order():
                if now - waiter.seen >= waiting_ttl_s:
                    del self.queue[waiter.robot_id]
                    lines.append(f"{waiter.robot_id} left the queue: not heard from for {now - waiter.seen:.0f}s")
        return lines

    def _lapse(self, robot_id: str, now: float) -> str:
        """End this robot's lease if it expired, queueing the robot at the back; the reason, or ''."""
        lease = self.leases.get(robot_id)
        if lease is None or now < lease.expires_at:
            return ""
        del self.leases[robot_id]
        # Last heard from when it last asked or renewed: a dead robot is then dropped by
        # the same sweep's waiting_ttl_s instead of being granted again and again.
        last_heard = lease.last_heard
        self.queue[robot_id] = Waiter(robot_id, lease.phase, self._seq(), now, max(0, min(now, last_heard)))
        return (f"lease {lease.lease_id} of {robot_id} expired (not renewed within {lease.ttl_s}s); "
                f"{robot_id} goes to the back of the queue")

    def _seq(self) -> int:
        if self.next_seq >= MAX_COUNTER:
            raise LeaseTableError("lease table queue counter is exhausted")
        self.next_seq += 1
        return self.next_seq - 1

    def _lease_id(self) -> int:
        if self.next_lease >= MAX_COUNTER:
            raise LeaseTableError("lease table lease counter is exhausted")
        self.next_lease += 1
        return self.next_lease - 1

    # -- bytes ----------------------------------------------------------------------------
    def render(self) -> bytes:
        """Canonical bytes (sorted keys, leases by id, queue by arrival): what the gateway persists."""
        doc = {
            "schema": SCHEMA, "next_seq": self.next_seq, "next_lease": self.next_lease,
            "leases": [{"robot": l.robot_id, "lease": l.lease_id, "phase": l.phase, "granted_at": l.granted_at,
                        "expires_at": l.expires_at, "ttl_s": l.ttl_s, **({} if l.heard is None else {"heard": l.heard})}
                       for l in sorted(self.leases.values(), key=lambda l: l.lease_id)],
            "queue": [{"robot": w.robot_id, "phase": w.phase, "seq": w.seq, "since": w.since, "seen": w.seen}
                      for w in sorted(self.queue.values(), key=lambda w: w.seq)],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def parse_table(data: bytes) -> LeaseTable:
    """The table these bytes hold, or LeaseTableError naming the first thing wrong."""
    if not isinstance(data, bytes):
        raise LeaseTableError("lease table is not bytes")
    if len(data) > MAX_TABLE_BYTES:
        raise LeaseTableError(f"lease table is larger than {MAX_TABLE_BYTES} bytes")
    check_depth(data, MAX_DEPTH, LeaseTableError, "lease table")
    doc = loads_strict(data, LeaseTableError, "lease table")
    _check_keys(doc, ("schema", "next_seq", "next_lease", "leases", "queue"), "lease table")
    if type(doc["schema"]) is not int or doc["schema"] != SCHEMA:
        raise LeaseTableError(f"lease table schema {str(doc['schema'])[:20]} is not supported (expected {SCHEMA})")
    table = LeaseTable()
    table.next_seq = _check_int(doc["next_seq"], 1, MAX_COUNTER, "lease table field 'next_seq'")
    table.next_lease = _check_int(doc["next_lease"], 1, MAX_COUNTER, "lease table field 'next_lease'")
    leases, queue = doc["leases"], doc["queue"]
    if not isinstance(leases, list) or not isinstance(queue, list):
        raise LeaseTableError("lease table fields 'leases' and 'queue' must be lists")
    if len(leases) + len(queue) > MAX_ENTRIES:
        raise LeaseTableError(f"lease table holds more than {MAX_ENTRIES} entries")
    for n, entry in enumerate(leases):
        lease = _lease(entry, f"lease table lease {n}")
        if lease.robot_id in table.leases:
            raise LeaseTableError(f"lease table grants robot {lease.robot_id!r} two leases")
        if lease.lease_id >= table.next_lease or any(l.lease_id == lease.lease_id for l in table.leases.values()):
            raise LeaseTableError(f"lease table lease {n} has id {lease.lease_id}, reused or not below next_lease")
        table.leases[lease.robot_id] = lease
    seqs: set[int] = set()
    for n, entry in enumerate(queue):
        waiter = _waiter(entry, f"lease table waiter {n}")
        if waiter.robot_id in table.queue or waiter.robot_id in table.leases:
            raise LeaseTableError(f"lease table holds robot {waiter.robot_id!r} twice (queued twice, or queued and leased)")
        if waiter.seq >= table.next_seq or waiter.seq in seqs:
            raise LeaseTableError(f"lease table waiter {n} has seq {waiter.seq}, reused or not below next_seq")
        seqs.add(waiter.seq)
        table.queue[waiter.robot_id] = waiter
    return table


def _lease(entry: Any, where: str) -> Lease:
    _check_keys(entry, ("robot", "lease", "phase", "granted_at", "expires_at", "ttl_s"), where, optional=("heard",))
    lease = Lease(_check_robot(entry["robot"], where), _check_int(entry["lease"], 1, MAX_COUNTER, f"{where} field 'lease'"),
                  _check_int(entry["phase"], 0, MAX_PHASE, f"{where} field 'phase'"), _time(entry, "granted_at", where),
                  _time(entry, "expires_at", where), _check_int(entry["ttl_s"], 1, MAX_TTL_S, f"{where} field 'ttl_s'"),
                  _time(entry, "heard", where) if "heard" in entry else None)
    if lease.expires_at < lease.granted_at:
        raise LeaseTableError(f"{where} expires before it was granted")
    return lease


def _waiter(entry: Any, where: str) -> Waiter:
    _check_keys(entry, ("robot", "phase", "seq", "since", "seen"), where)
    waiter = Waiter(_check_robot(entry["robot"], where), _check_int(entry["phase"], 0, MAX_PHASE, f"{where} field 'phase'"),
                    _check_int(entry["seq"], 1, MAX_COUNTER, f"{where} field 'seq'"), _time(entry, "since", where),
                    _time(entry, "seen", where))
    return waiter


def _check_keys(doc: Any, keys: tuple[str, ...], where: str, optional: tuple[str, ...] = ()) -> None:
    if not isinstance(doc, dict):
        raise LeaseTableError(f"{where} is not a JSON object")
    missing, extra = set(keys) - set(doc), set(doc) - set(keys) - set(optional)
    if missing:
        raise LeaseTableError(f"{where} lacks field {sorted(missing)[0]!r}")
    if extra:
        raise LeaseTableError(f"{where} has an unknown field {sorted(extra)[0][:40]!r}")


def _check_int(value: Any, low: int, high: int, what: str) -> int:
    if type(value) is not int or not low <= value <= high:
        raise LeaseTableError(f"{what} must be a whole number between {low} and {high}")
    return value


def _time(entry: dict, key: str, where: str) -> float:
    value = entry[key]
    if type(value) not in (int, float) or not 0 <= value <= MAX_EPOCH:
        raise LeaseTableError(f"{where} field {key!r} must be a time in seconds between 0 and {MAX_EPOCH}")
    return value


def _check_robot(value: Any, where: str = "request") -> str:
    if not isinstance(value, str) or not ID.fullmatch(value):
        raise LeaseTableError(f"{where} robot {str(value)[:40]!r} is not a robot id")
    return value
