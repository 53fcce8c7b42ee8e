"""The site's orchestrator (issue 16): who of this gateway's robots may be out of service now.

Robots ask POST /lease (Wire 5, docs/formats.md) before they stop their app.
Every call runs under one lock, in this order: sweep expired leases and stale
waiters (`LeaseTable.expire`), apply the robot's operation, serve the queue
(`LeaseTable.grant`, deciding each waiter by the maintenance window, then the
budget), persist the table when leases or the queue changed, then log the
decisions and answer. A robot is never told anything that is not on disk: a
kill -9 between two calls leaves a table that restores every lease, so no
restart grants a lease twice (otad/gateway/leasefiles.py).

What applies to a robot is the current plan whose version is the one the robot
asked for: its `site_max_concurrent` and `windows` replace SITE_MAX_CONCURRENT
and MAINTENANCE_WINDOWS for it. The window check expects an install to take the
median of this site's last 20 committed installs (INSTALL_ESTIMATE_S until 3 are
measured). A robot of a group counts as `down` (against min_available) when
the gateway has not heard from it, on any authenticated edge request, for
3 x max(LEASE_RETRY_S, 60) s, counted from the gateway's start at the earliest.
The site view (`snapshot`) and STATUS= are in otad/gateway/orchview.py.
"""
from __future__ import annotations

import logging
import statistics
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from zoneinfo import ZoneInfo

from otad.gateway.leasefiles import LeaseFiles, OrchestrationFileError
from otad.gateway.leasewire import LeaseRequest
from otad.gateway import orchview
from otad.orchestration import Verdict
from otad.orchestration.budget import Budget, Groups, Limit, may_grant, parse_limit
from otad.orchestration.leases import Answer, Decision
from otad.orchestration.windows import Schedule, clock_text, closes_at, fits, is_open, next_open, parse_windows
from otad.rollout.cohort import phase_of
from otad.rollout.plan import Plan
from otad.semver import same_version

log = logging.getLogger("otad.gateway")
EVERYONE = Limit(hundredths=10_000)  # no SITE_MAX_CONCURRENT: every robot may update at once (today's behaviour)
MIN_MEASURED = 3
WINDOW_REASONS = ("outside window", "window closes")  # shown by the robot as they are (`otadctl status`)


@dataclass(frozen=True)
class OrchestrationSettings:
    """The gateway.conf keys of site orchestration (docs/operations.md)."""

    site: str
    limit: Limit | None  # SITE_MAX_CONCURRENT; None: no limit
    groups: Groups
    windows: Schedule | None  # MAINTENANCE_WINDOWS; None: always open
    timezone: ZoneInfo  # SITE_TIMEZONE
    ttl_s: int
    retry_s: int
    estimate_s: int

    @property
    def waiting_ttl_s(self) -> int:
        return max(60, 6 * self.retry_s)

    @property
    def down_after_s(self) -> int:
        return 3 * max(self.retry_s, 60)


@dataclass(frozen=True)
class Policy:
    """What applies to one robot: the budget's limit and where it comes from, and the window."""

    limit: Limit
    source: str  # "SITE_MAX_CONCURRENT", "plan <rollout_id>" or "none"
    plan_limit: Limit | None
    windows: Schedule | None


@dataclass
class Deferred:
    since: float
    reason: str
    too_long: bool


@lru_cache(maxsize=64)
def _plan_windows(text: str) -> Schedule:
    return parse_windows(text)  # checked when the plan was parsed: cannot fail here


@lru_cache(maxsize=64)
def _plan_limit(text: str) -> Limit:
    return parse_limit(text, "plan site_max_concurrent")


class Orchestrator:
    def __init__(self, state_dir: Path, settings: OrchestrationSettings, plans: Callable[[], list[Plan]],
                 now: float) -> None:
        self.settings = settings
        self.plans = plans  # the verified current plans (otad.gateway.rollouts)
        self.files = LeaseFiles(state_dir)
        self.lock = threading.Lock()
        self.site_robots = 1  # robots of ROBOT_TOKENS_FILE, set by the gateway (what a percentage is of)
        self.started = now
        self.heard: dict[str, float] = {}
        self.deferred: dict[str, Deferred] = {}
        self.said: dict[str, str] = {}  # robot -> the last reason it was told it waits (journal once per change)
        self._dirty = False
        self._unlogged: list[tuple[int, str]] = []
        self.table = self.files.load_table()
        self.installs = self.files.load_installs()
        self._resume(now)

    def _resume(self, now: float) -> None:
        """After a restart: robots could not renew or ask while the gateway was down, so a held
        lease runs at least one more TTL from now and a waiter counts as heard from now."""
        table = self.table
        for robot, lease in list(table.leases.items()):
            table.leases[robot] = replace(lease, expires_at=max(lease.expires_at, now + lease.ttl_s))
        for robot, waiter in list(table.queue.items()):
            table.queue[robot] = replace(waiter, seen=max(waiter.seen, now))
        if table.leases or table.queue:
            log.info("lease: kept %d lease(s) (%s) and %d waiter(s) from %s; held leases run at least one more "
                     "TTL (their robots could not renew while the gateway was down)", len(table.leases),
                     ", ".join(f"{r} {l.lease_id}" for r, l in sorted(table.leases.items())) or "none",
                     len(table.queue), self.files.leases_path)
            self._dirty = True

    def configure(self, settings: OrchestrationSettings) -> None:
        """SIGHUP: new budget, groups, windows and times apply from the next call."""
        with self.lock:
            self.settings = settings

    def heard_from(self, robot: str, now: float) -> None:
        """Any authenticated edge request: the robot is up (it does not count as `down`)."""
        self.heard[robot] = now

    def snapshot(self, now: float) -> dict:
        """The site view (docs/formats.md "Site orchestration snapshot")."""
        return orchview.snapshot(self, now)

    def status(self, now: float) -> str:
        return orchview.status(self, now)

    # -- what applies ----------------------------------------------------------------
    def plan_for(self, version: str | None) -> Plan | None:
        if not version:
            return None
        return next((p for p in sorted(self.plans(), key=lambda p: p.rollout_id) if same_version(p.version, version)), None)

    def policy(self, version: str | None) -> Policy:
        plan, cfg = self.plan_for(version), self.settings
        plan_limit = _plan_limit(plan.site_max_concurrent) if plan is not None and plan.site_max_concurrent else None
        windows = _plan_windows(plan.windows) if plan is not None and plan.windows else cfg.windows
        if plan_limit is not None:
            return Policy(plan_limit, f"plan {plan.rollout_id}", plan_limit, windows)
        if cfg.limit is not None:
            return Policy(cfg.limit, "SITE_MAX_CONCURRENT", None, windows)
        return Policy(EVERYONE, "none", None, windows)

    def install_estimate(self) -> float:
        durations = self.installs.durations
        return float(statistics.median(durations)) if len(durations) >= MIN_MEASURED else float(self.settings.estimate_s)

    def window(self, windows: Schedule | None, now: float, expected: float | None = None) -> Verdict:
        """The window's verdict for a lease starting now, with the short reason robots show."""
        if windows is None:
            return Verdict(True, "open (no maintenance window)")
        tz = self.settings.timezone
        expected = self.install_estimate() if expected is None else expected
        if not is_open(windows, tz, now):
            opens = next_open(windows, tz, now)
            if opens is None:
                return Verdict(False, "outside window (none opens within two weeks)")
            when = clock_text(opens, now, tz)
            return Verdict(False, f"outside window until {when}" if ":" in when and " " not in when
                           else f"outside window (opens {when})")
        closes = closes_at(windows, tz, now)
        if closes is None:
            return Verdict(True, "open (always)")
        if not fits(windows, tz, now, expected).ok:
            return Verdict(False, f"window closes at {clock_text(closes, now, tz)}, before an install of about "
                                  f"{expected:.0f}s would end")
        return Verdict(True, f"open until {clock_text(closes, now, tz)}")

    def down(self, now: float) -> frozenset[str]:
        cutoff = now - self.settings.down_after_s
        robots = self.settings.groups.member
        return frozenset(r for r in robots if max(self.heard.get(r, 0.0), self.started) < cutoff)

    def _decider(self, now: float):
        windows_seen: dict[int, Verdict] = {}
        down = self.down(now)

        def decide(robot: str, phase: int, held: frozenset[str]) -> Verdict:
            policy = self.policy(self.installs.versions.get(robot))
            if policy.windows is not None:
                verdict = windows_seen.get(id(policy.windows))
                if verdict is None:
                    verdict = windows_seen[id(policy.windows)] = self.window(policy.windows, now)
                if not verdict.ok:
                    return verdict
            budget = Budget(self.settings.limit or EVERYONE, self.settings.groups, policy.plan_limit)
            return may_grant(robot, held, budget, self.site_robots, down)

        return decide

    def sweep(self, now: float) -> None:
        """Between requests (the daemon's tick): end expired leases and stale waiters, so the expiry
        is logged and STATUS= and the site view are right even when no robot asks; a slot freed
        goes to the next waiter, who learns it at its next ask."""
        with self.lock:
            table = self.table
            due = any(now >= l.expires_at for l in table.leases.values()) or any(
                now - w.seen >= self.settings.waiting_ttl_s for w in table.queue.values())
            if not due:  # (a table that failed to save is saved by the next request, not retried here each second)
                return
            before = self._shape()
            lines = [(logging.INFO, f"lease: {line}") for line in table.expire(now, self.settings.waiting_ttl_s)]
            lines += self._journal(table.grant(now, self.settings.ttl_s, self._decider(now)))
            self._forget_versions()
            self._persist(before, lines)

    # -- POST /lease ----------------------------------------------------------------
    def handle(self, robot: str, request: LeaseRequest, now: float) -> dict:
        """Apply one Wire 5 request and answer it; OrchestrationFileError when the table could not
        be persisted (the robot asks again: nothing it was told is lost)."""
        with self.lock:
            self.heard[robot] = now
            before = self._shape()
            lines = [(logging.INFO, f"lease: {line}") for line in self.table.expire(now, self.settings.waiting_ttl_s)]
            answer = self._apply(robot, request, now, lines)
            decisions = self.table.grant(now, self.settings.ttl_s, self._decider(now))
            lines += self._journal(decisions)
            if request.op == "request" and answer.state == "waiting" and robot in self.table.leases:
                lease = self.table.leases[robot]
                answer = Answer("granted", next(d.verdict.reason for d in decisions if d.robot_id == robot), lease)
            self._forget_versions()
            self._persist(before, lines)
            return self._reply(robot, answer)

    def _apply(self, robot: str, request: LeaseRequest, now: float, lines: list) -> Answer:
        table = self.table
        if request.op == "request":
            self.deferred.pop(robot, None)
            self.installs.versions[robot] = request.version
            plan = self.plan_for(request.version)
            phase = (phase_of(plan, robot) or 0) if plan is not None else 0
            return table.request(robot, phase, now)
        if request.op == "renew":
            answer = table.renew(robot, request.lease, now)
            if answer.state == "refused":
                # Its lease lapsed mid-install: it goes on (stopping mid-swap is worse) and releases at
                # the end. It is not waiting for another lease, so it must not be granted one.
                table.withdraw(robot)
                lines.append((logging.WARNING, f"lease: renew of lease {request.lease} by {robot} refused: {answer.reason}"))
            return answer
        if request.op == "release":
            lease = table.leases.get(robot)
            answer = table.release(robot, request.lease, request.outcome, now)
            if answer.state == "released" and lease is not None and lease.lease_id == request.lease:
                took = now - lease.granted_at
                if request.outcome == "committed":
                    self.installs.add(took)
                lines.append((logging.INFO, f"lease: {robot} released lease {lease.lease_id} "
                                            f"({self.installs.versions.get(robot, '?')}): {request.outcome} after {took:.0f}s"))
            elif answer.state == "refused":
                lines.append((logging.WARNING, f"lease: release of lease {request.lease} by {robot} refused: {answer.reason}"))
            return answer
        answer = table.withdraw(robot)
        lease = table.leases.get(robot)
        if lease is not None:
            # A robot that says it is not ready is not installing: this lease was granted during
            # another robot's call, after it last asked, and it never learnt of it (or it is about
            # to give it back as withdrawn). The slot goes on now, not after the lease's TTL.
            table.release(robot, lease.lease_id, "withdrawn", now)
            lines.append((logging.INFO, f"lease: {robot} deferred while holding lease {lease.lease_id}; "
                                        "the lease ends (withdrawn)"))
        old = self.deferred.get(robot)
        self.deferred[robot] = Deferred(old.since if old else now, request.reason, request.too_long)
        if old is None or (old.reason, old.too_long) != (request.reason, request.too_long):
            too_long = " (deferred too long)" if request.too_long else ""
            lines.append((logging.INFO, f"lease: {robot} deferred{too_long}: {request.reason}"))
        self.said.pop(robot, None)
        return Answer("deferred", request.reason)

    def _journal(self, decisions: list[Decision]) -> list[tuple[int, str]]:
        lines = []
        for d in decisions:
            version = self.installs.versions.get(d.robot_id, "?")
            if d.lease is not None:
                self.said.pop(d.robot_id, None)
                lines.append((logging.INFO, f"lease: granted lease {d.lease.lease_id} to {d.robot_id} for {version} "
                                            f"for {d.lease.ttl_s}s: {d.verdict.reason}"))
            elif self.said.get(d.robot_id) != d.verdict.reason:
                self.said[d.robot_id] = d.verdict.reason
                lines.append((logging.INFO, f"lease: {d.robot_id} waits for {version}: {d.verdict.reason}"))
        return lines

    def _forget_versions(self) -> None:
        """Robots that neither hold a lease nor wait: no version to remember, no reason told (one
        that comes back is logged afresh)."""
        kept = set(self.table.leases) | set(self.table.queue)
        for robot in [r for r in self.installs.versions if r not in kept]:
            del self.installs.versions[robot]
        for robot in [r for r in self.said if r not in self.table.queue]:
            del self.said[robot]

    def _shape(self) -> tuple:
        """What must be on disk before an answer: leases, queue membership and order, counters,
        and the versions that pick each robot's plan (a waiter's `seen` alone is not worth an fsync)."""
        table = self.table
        return (dict(table.leases), [(w.robot_id, w.phase, w.seq, w.since) for w in table.order()],
                table.next_seq, table.next_lease, dict(self.installs.versions), tuple(self.installs.durations))

    def _persist(self, before: tuple, lines: list[tuple[int, str]]) -> None:
        after = self._shape()
        lines = self._unlogged + lines
        self._unlogged = []
        if after != before or self._dirty:
            try:
                if after[4:] != before[4:] or self._dirty:
                    self.files.save_installs(self.installs)
                self.files.save_table(self.table)
            except OrchestrationFileError as exc:
                self._dirty = True  # saved by the next call, before it answers
                self._unlogged = lines
                log.error("lease: %s; answering 503 until it can be written", exc)
                raise
            self._dirty = False
        for level, line in lines:
            log.log(level, "%s", line)

    def _reply(self, robot: str, answer: Answer) -> dict:
        retry = self.settings.retry_s
        if answer.state == "granted" and answer.lease is not None:
            return {"state": "granted", "reason": answer.reason, "lease": answer.lease.lease_id,
                    "ttl_s": answer.lease.ttl_s, "ahead": None, "retry_s": retry}
        if answer.state == "waiting":
            ahead = self.table.ahead(robot)
            why = self.said.get(robot, "")
            reason = why if why.startswith(WINDOW_REASONS) else \
                f"{robot} waits for a lease ({ahead} ahead)" + (f": {why}" if why else "")
            return {"state": "waiting", "reason": reason, "lease": None, "ttl_s": None, "ahead": ahead, "retry_s": retry}
        return {"state": answer.state, "reason": answer.reason, "lease": None, "ttl_s": None, "ahead": None, "retry_s": retry}
