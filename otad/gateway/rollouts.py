"""The gateway's side of staged rollouts (issue 15): take plans, decide phases, assign releases.

- `take_plans` (sync thread, Wire 1): each item is verified (otad.rollout.signed:
  ROLLOUT_KEYS, expiry, never a release key's signature) and passed through the
  replay guard (check_revision); the seen revisions are persisted before the plan
  is kept, and the kept plans are persisted so the site works offline after a restart.
- `decide` (sync thread, every poll, online or not): otad.rollout.progress.advance
  per plan on this site's evidence: start the next phase, or halt the site on its
  criteria. One log line per decision, naming rollout, phase and reason. A plan
  revision that is not `active` (a fleet-wide pause or abort) wins: nothing opens.
- `observe` (edge threads, POST /metrics): robots' rollout events (Wire 3) and
  each robot's reported version. A new event is evidence the site can act on at
  once: its rollout is decided again before the POST is answered, so a canary's
  rollback halts the site then, not at the next poll (which, with the WAN down,
  comes only after the sync worker's backoff, up to BACKOFF_MAX).
- `serve` (edge threads, GET /manifest): the version otad.rollout.cohort.assignment
  gives the robot now; `offered` is recorded when the target is first handed out.
- `reports` (Wire 4): what the site decided, per rollout, until the dashboard took it.
Pure decisions live in otad/rollout/; this module only feeds them and persists.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from otad.errors import OtadError
from otad.gateway.rollstate import MAX_EVENTS, MAX_ROBOTS, RolloutFiles, RolloutRecord, SiteState
from otad.rollout.cohort import assignment, is_targeted
from otad.rollout.plan import Plan
from otad.rollout.progress import FAILURES, Event, advance, opened_phases, tally
from otad.rollout.signed import VerifiedPlan, check_revision, verify_plan
from otad.semver import Version, same_version
from otad.trust.keys import PublicKey

log = logging.getLogger("otad.gateway")
MAX_PLANS_BYTES = 4 * 1024 * 1024  # Wire 1 body: 64 KiB plans + bundles, a few dozen at most
MAX_PLAN_ITEMS = 64
MAX_REPORT_REASON = 300  # the dashboard takes one line of at most 300 characters (Wire 4)
ROBOT_EVENTS = ("installed", "committed", *FAILURES)


@dataclass(frozen=True)
class Current:
    item: dict  # the Wire 1 item, as served to robots (GET /rollout.json)
    verified: VerifiedPlan

    @property
    def plan(self) -> Plan:
        return self.verified.plan


@dataclass(frozen=True)
class Served:
    version: str | None  # the release to serve; None: the newest cached one
    reason: str
    hold: bool = False  # a plan concerns the robot but assigns it nothing now


class Rollouts:
    def __init__(self, state_dir: Path, site: str, rollout_keys: tuple[PublicKey, ...],
                 release_keys: tuple[PublicKey, ...], now: float) -> None:
        self.site = site
        self.rollout_keys, self.release_keys = rollout_keys, release_keys
        self.files = RolloutFiles(state_dir)
        self._lock = threading.RLock()
        self.enabled = bool(rollout_keys)  # fixed until a restart: the state is read once, at start
        self.seen: dict = {}
        self.state = SiteState()
        self.current: dict[str, Current] = {}
        self._last_body: bytes | None = None
        self._online = False  # the dashboard answered the last poll: what a decision between polls assumes
        # A save that failed (disk full) leaves decisions in memory only: the next decision saves
        # again even if nothing new happened, and logs the lines held back until then.
        self._unsaved = False
        self._unlogged: list[tuple[int, str]] = []
        if not self.enabled:
            return  # no ROLLOUT_KEYS: today's behaviour, nothing read or written
        self.seen = self.files.load_seen()
        self.state = self.files.load_site()
        for item in self.files.load_plans():
            verified = self._verify(item, now, "kept")
            if verified is not None:
                self.current[verified.plan.rollout_id] = Current(item, verified)

    def configure(self, rollout_keys: tuple[PublicKey, ...], release_keys: tuple[PublicKey, ...]) -> None:
        """SIGHUP: other rollout keys apply at the next poll; turning rollouts on or off needs a restart."""
        if bool(rollout_keys) != self.enabled:
            log.warning("ROLLOUT_KEYS %s; it takes effect at the next restart", "set" if rollout_keys else "emptied")
            return
        with self._lock:
            self.rollout_keys, self.release_keys = rollout_keys, release_keys
            self._last_body = None  # a key added may make a refused plan acceptable

    # -- Wire 1 -------------------------------------------------------------------------
    def take_plans(self, body: bytes, now: float) -> None:
        """The dashboard's /rollouts.json: keep every item that verifies and is not a replay.
        The same body as last time is not looked at again (nor its refusals logged again)."""
        digest = hashlib.sha256(body).digest()
        if digest == self._last_body:
            return
        self._last_body = digest
        try:
            doc = json.loads(body)
            items = doc["plans"] if isinstance(doc, dict) else None
            if not isinstance(items, list):
                raise ValueError("no 'plans' list")
        except (ValueError, KeyError, UnicodeDecodeError, RecursionError) as exc:
            log.warning("rollout: refused the dashboard's rollouts.json: not a plans document (%s)", str(exc)[:80])
            return
        if len(items) > MAX_PLAN_ITEMS:
            log.warning("rollout: refused the dashboard's rollouts.json: more than %d plans", MAX_PLAN_ITEMS)
            return
        with self._lock:
            changed = False
            for n, item in enumerate(items):
                verified = self._verify(item, now, f"item {n} of rollouts.json")
                if verified is not None and isinstance(item, dict) and self._accept(item, verified):
                    changed = True
            if changed:
                self.files.save_plans([c.item for c in self.current.values()])

    def _verify(self, item: object, now: float, where: str) -> VerifiedPlan | None:
        try:
            if not isinstance(item, dict):
                raise ValueError("an item must be a JSON object")
            text, bundle = item.get("plan"), item.get("bundle")
            if not isinstance(text, str) or not isinstance(bundle, dict):
                raise ValueError("an item needs 'plan' (a string) and 'bundle' (an object)")
            return verify_plan(text.encode("utf-8"), json.dumps(bundle).encode(), self.rollout_keys, now, self.release_keys)
        except (OtadError, ValueError, UnicodeEncodeError, RecursionError, TypeError) as exc:
            log.warning("rollout: refused plan (%s): %s", where, str(exc)[:300])
            return None

    def _accept(self, item: dict, verified: VerifiedPlan) -> bool:
        plan = verified.plan
        decision, seen = check_revision(self.seen, verified)
        if not decision.accepted:
            log.warning("rollout %s: refused revision %d: %s", plan.rollout_id, plan.revision, decision.reason)
            return False
        if not decision.newer:
            return False
        self.files.save_seen(seen)  # before acting on it: a restart must not take an older one back
        self.seen = seen
        self.current[plan.rollout_id] = Current(item, verified)
        log.info("rollout %s: took revision %d (%s, target %s)%s", plan.rollout_id, plan.revision, plan.state,
                 plan.version, f": {plan.reason}" if plan.reason else "")
        return True

    def expire(self, now: float) -> None:
        with self._lock:
            gone = [rid for rid, c in self.current.items() if c.plan.expires_epoch < now]
            for rid in gone:
                log.info("rollout %s: revision %d expired at %s; no longer carried out", rid,
                         self.current[rid].plan.revision, self.current[rid].plan.expires)
                del self.current[rid]
            if gone:
                self.files.save_plans([c.item for c in self.current.values()])

    # -- phase decisions ----------------------------------------------------------------
    def decide(self, now: float, online: bool) -> bool:
        """One decision per current plan; returns True when anything changed. A decision is
        persisted before it is logged, and before the edge (which takes the same lock) acts on it."""
        with self._lock:
            self._online = online
            return self._decide_some(sorted(self.current), now, online)

    def _decide_some(self, rids: list[str], now: float, online: bool) -> bool:
        """Decide these rollouts; persist what changed, then log it. The caller holds the lock."""
        lines, self._unlogged = self._unlogged, []
        changed = False
        for rid in rids:
            before = self._record(rid)
            lines += self._decide(rid, self.current[rid].plan, now, online)
            changed |= self._record(rid) != before
        if changed or self._unsaved:
            try:
                self._save_site()
            except BaseException:
                self._unlogged = lines  # logged once the decision is on disk
                raise
        for level, line in lines:
            log.log(level, "%s", line)
        return changed

    def _save_site(self) -> None:
        try:
            self.files.save_site(self.state)
        except BaseException:
            self._unsaved = True
            raise
        self._unsaved = False

    def _record(self, rid: str) -> tuple:
        rec = self.state.rollouts.get(rid)
        return (dict(rec.started), rec.halted) if rec is not None else ({}, None)

    def _decide(self, rid: str, plan: Plan, now: float, online: bool) -> list[tuple[int, str]]:
        rec = self.state.rollouts.setdefault(rid, RolloutRecord())
        evidence = self._evidence(plan, rec, now, since=plan.halt_since_epoch)  # a resume starts the criteria afresh
        progress, started = advance(plan, rec.started, evidence, now, site=self.site, online=online)
        lines = []
        if progress.advance:
            rec.started = started
            rec.reasons[progress.opened] = progress.waiting
            lines.append((logging.INFO, f"rollout {rid} phase {progress.opened}: started at site {self.site}: {progress.waiting}"))
        if progress.halt is not None and rec.halted is None:
            halt = progress.halt
            rec.halted = {"at": now, "reason": halt.reason, "phase": halt.phase, "state": halt.state, "revision": plan.revision}
            rec.reasons[halt.phase] = halt.reason
            then = "robots on the target return" if halt.state == "aborted" else "robots keep what they have"
            lines.append((logging.WARNING, f"rollout {rid} phase {halt.phase}: site {self.site} halted ({then}): {halt.reason}"))
        elif progress.halt is None and rec.halted is not None and plan.state == "active" \
                and plan.revision != rec.halted.get("revision"):
            lines.append((logging.INFO, f"rollout {rid} phase {rec.halted['phase']}: revision {plan.revision} lifts "
                                        f"the site halt ({progress.waiting})"))
            rec.halted = None
        if not progress.advance and progress.halt is None and progress.next_at is None and progress.waiting != rec.said:
            # A stable reason (held, waiting for approval, stopped) once; not a soak's countdown.
            rec.said = progress.waiting
            lines.append((logging.INFO, f"rollout {rid} phase {max(progress.opened - 1, 0)}: {progress.waiting}"))
        return lines

    def _evidence(self, plan: Plan, rec: RolloutRecord, now: float, since: float = 0.0):
        return tally(plan, (replace(e, site=self.site) for e in rec.events), now, since)

    def _halted(self, rid: str) -> bool:
        rec = self.state.rollouts.get(rid)
        return rec is not None and rec.halted is not None

    # -- POST /metrics ------------------------------------------------------------------
    def observe(self, records: list[dict], now: float) -> None:
        """Robots' rollout events and versions from records the buffer accepted."""
        if not self.enabled:
            return
        with self._lock:
            changed = False
            evidence: set[str] = set()  # rollouts with a new event
            for record in records:
                changed |= self._version(record)
                if record.get("type") == "event" and record.get("event") in ROBOT_EVENTS and "rollout_id" in record:
                    if self._event(record["rollout_id"], record["robot_id"], record["phase"], record["event"], now):
                        changed = True
                        evidence.add(record["rollout_id"])
            if changed:
                self._save_site()
            # On the evidence itself: a halt (or a commit completing min_attempts) takes effect before
            # the robot is answered, and before any other robot asks /manifest again.
            self._decide_some(sorted(evidence & set(self.current)), now, self._online)

    def _version(self, record: dict) -> bool:
        # A metric says what the robot runs (CURRENT); remember the one before it for a rollback.
        if record.get("type") != "metric" or not record.get("version"):
            return False
        robot, version = record["robot_id"], record["version"]
        info = self.state.robots.get(robot)
        if info is not None and info["version"] == version:
            return False
        if info is None and len(self.state.robots) >= MAX_ROBOTS:
            return False
        self.state.robots[robot] = {"version": version, "came_from": info["version"] if info else None}
        return True

    def _event(self, rid: str, robot: str, phase: int, kind: str, now: float) -> bool:
        rec = self.state.rollouts.setdefault(rid, RolloutRecord())
        if rec.has(robot, phase, kind):
            return False
        if len(rec.events) >= MAX_EVENTS:
            log.warning("rollout %s: %d events held; %s's %s is not counted", rid, MAX_EVENTS, robot, kind)
            return False
        rec.events.append(Event(robot, "", phase, kind, now))
        log.info("rollout %s phase %d: robot %s %s", rid, phase, robot, kind)
        return True

    # -- GET /manifest, /rollout.json ---------------------------------------------------
    def serve(self, robot: str, cached: set[str], now: float) -> Served:
        """The release this robot may have now. Records `offered` when it is a phase's target."""
        with self._lock:
            info = self.state.robots.get(robot) or {}
            version, came_from = info.get("version"), info.get("came_from")
            concerned = None
            for rid, current in sorted(self.current.items()):
                plan = current.plan
                if not self._concerns(plan, robot, version):
                    continue
                rec = self.state.rollouts.get(rid) or RolloutRecord()
                given = assignment(plan, robot, version, opened_phases(rec.started), halted=rec.halted is not None,
                                   came_from=came_from)
                if given.version is not None and given.version in cached:
                    if not given.rollback and given.phase is not None and self._event(rid, robot, given.phase, "offered", now):
                        self._save_site()
                    return Served(given.version, given.reason)
                if given.version is not None:
                    given = replace(given, reason=f"{given.reason}, which is not cached yet")
                concerned = concerned or (plan, given.reason)
            if concerned is None:
                return Served(None, "no rollout concerns this robot")
            plan, reason = concerned
            return Served(self._hold_version(version, cached), reason, hold=True)

    def _concerns(self, plan: Plan, robot: str, version: str | None) -> bool:
        # A robot not heard from yet (no metric with its version) counts as targeted: the
        # target must not reach it as "the newest" before its phase.
        return version is None or is_targeted(plan, version)

    def _hold_version(self, version: str | None, cached: set[str]) -> str | None:
        """What a robot waiting for its phase is served: its own version, else the newest cached
        release that no current plan targets (never a target it was not assigned)."""
        targets = {c.plan.version for c in self.current.values()}
        if version is not None and version in cached:
            return version
        others = sorted((v for v in cached if v not in targets), key=Version)
        return others[-1] if others else None

    def plans_for(self, robot: str | None) -> list[dict]:
        """Wire 2 GET /rollout.json: the items of the plans that concern this robot (all: anonymous)."""
        with self._lock:
            info = (self.state.robots.get(robot) or {}) if robot else {}
            return [c.item for _, c in sorted(self.current.items())
                    if robot is None or self._concerns(c.plan, robot, info.get("version"))]

    def needed_versions(self) -> frozenset[str]:
        """Versions GC must keep: every current plan's target and the versions its robots came from."""
        with self._lock:
            needed = set()
            for current in self.current.values():
                needed.add(current.plan.version)
                needed.update(current.plan.from_versions)
            # What a rollback returns robots on a target to.
            needed.update(i["came_from"] for i in self.state.robots.values()
                          if i.get("came_from") and any(same_version(i.get("version"), v) for v in set(needed)))
            return frozenset(needed)

    # -- Wire 4 -------------------------------------------------------------------------
    def reports(self, now: float) -> list[tuple[str, bytes, str]]:
        """(rollout_id, body, digest) of every site report the dashboard has not taken yet."""
        with self._lock:
            out = []
            for rid, current in sorted(self.current.items()):
                rec = self.state.rollouts.get(rid)
                if rec is None:
                    continue
                body = json.dumps(self._report(current.plan, rec, now), sort_keys=True).encode()
                digest = hashlib.sha256(body).hexdigest()
                if digest != rec.reported:
                    out.append((rid, body, digest))
            return out

    def reported(self, rid: str, digest: str) -> None:
        with self._lock:
            rec = self.state.rollouts.get(rid)
            if rec is not None and rec.reported != digest:
                rec.reported = digest
                self._save_site()

    def _report(self, plan: Plan, rec: RolloutRecord, now: float) -> dict:
        counts = self._evidence(plan, rec, now).sites.get(self.site, {})
        halted = rec.halted
        phases = []
        for n in range(len(plan.phases)):
            c = counts.get(n)
            phases.append({"index": n, "started_at": rec.started.get(n),
                           "halted_at": halted["at"] if halted and halted["phase"] == n else None,
                           "reason": rec.reasons.get(n, "")[:MAX_REPORT_REASON],
                           "counts": {"attempts": c.attempts if c else 0, "committed": c.committed if c else 0,
                                      "failed": c.failed if c else 0}})
        return {"site": self.site, "rollout_id": plan.rollout_id, "revision": plan.revision, "phases": phases,
                "halted": {"at": halted["at"], "reason": halted["reason"][:MAX_REPORT_REASON]} if halted else None}
