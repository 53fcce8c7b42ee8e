"""The dashboard's rollout desk: plans and their signed revisions, status, fleet-wide halts.

Every decision is otad/rollout's: plans are made and revised by plan.py
(`plan_from_doc`, `revise`), signed by signed.py with the rollout key
(ROLLOUT_KEY), counted and judged by progress.py (`tally`, `find_halt`) and
cohorts come from cohort.py. This module only reads and writes the store.

A revision is issued in three steps: read the latest revision, make the next
one with `revise`, store it with `add_revision`, which takes it only if it is
still the next one. So two operators (or an operator and the fleet halt) acting
at once never issue one revision number twice: the loser gets 409 and sees the
winner's revision. Nothing is answered, served or logged before it is stored.
"""
from __future__ import annotations

import json
import logging
import math
import threading
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from otad.dashboard.ota import OtaFolder
from otad.dashboard.rollout_status import FLEET_ACTOR, CohortCache, rollout_status
from otad.dashboard.rollout_store import RevisionConflict, RolloutStore, StoredRevision
from otad.dashboard.site_view import site_views
from otad.errors import OtadError
from otad.rollout import progress
from otad.rollout.plan import _ID as ROLLOUT_ID, Plan, PlanError, plan_from_doc, parse_plan, revise
from otad.rollout.signed import sign_plan
from otad.telemetry.tokens import TokenTable
from otad.trust.manifest import utc_timestamp

log = logging.getLogger("otad.dashboard")

ACTIONS = ("pause", "resume", "approve", "abort")


class RolloutError(OtadError):
    """A refused admin request; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class RolloutDesk:
    def __init__(self, store: RolloutStore, key: ec.EllipticCurvePrivateKey | None, ota: OtaFolder,
                 operators: TokenTable | None = None) -> None:
        self.store, self.key, self.ota = store, key, ota
        self.operators = operators  # OPERATOR_TOKENS_FILE, swapped on SIGHUP
        # Set when a gateway forwards robots' rollout events: the fleet-halt worker judges them
        # then, not at the end of its ROLLOUT_CHECK_INTERVAL (see wait_for_evidence).
        self._evidence = threading.Event()
        self.cohorts = CohortCache()  # robots' phases: the status of 10,000 robots hashes none of them again

    # -- operators' requests ----------------------------------------------------------

    def create(self, doc: Any, actor: str, now: float) -> StoredRevision:
        """Revision 1 of a new plan from the operator's fields (no revision, no signature)."""
        if not isinstance(doc, dict):
            raise RolloutError("body must be a JSON object holding the plan's fields")
        if "revision" in doc:
            raise RolloutError("leave 'revision' out: the dashboard numbers revisions (a new plan is revision 1)")
        if doc.get("state", "active") != "active":
            raise RolloutError("a new plan starts active; pause or abort it afterwards")
        try:
            plan = plan_from_doc({"schema": 1, **doc, "revision": 1})
        except PlanError as exc:
            raise RolloutError(str(exc)) from None
        if plan.expires_epoch <= now:
            raise RolloutError(f"plan expires at {plan.expires}, which is not in the future")
        if why := self.ota.unpublished(plan.version):
            raise RolloutError(f"version {plan.version} cannot be rolled out: {why}", 409)
        if self.store.latest_revision(plan.rollout_id) is not None:
            raise RolloutError(f"rollout {plan.rollout_id} exists already: choose another rollout_id", 409)
        return self._issue(plan, actor, now)

    def act(self, rollout_id: str, action: str, doc: Any, actor: str, now: float) -> StoredRevision:
        """pause, resume, approve (the next phase, or {"phase": N}) or abort: the next signed revision."""
        if not isinstance(doc, dict):
            raise RolloutError("body must be a JSON object (it may be empty: {})")
        unknown = set(doc) - {"reason", "phase"}
        if unknown:
            raise RolloutError(f"unknown field {sorted(unknown)[0][:40]!r} (allowed: reason, phase)")
        reason = doc.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise RolloutError("'reason' must be a string")
        plan = self._plan(rollout_id)
        if plan.state == "aborted":
            raise RolloutError(f"rollout {rollout_id} is aborted (final): create a new rollout", 409)
        changes = self._changes(plan, action, doc, reason or f"{action} by {actor}", now)
        try:
            revised = revise(plan, **changes)
        except PlanError as exc:
            raise RolloutError(str(exc)) from None
        return self._issue(revised, actor, now)

    @staticmethod
    def _changes(plan: Plan, action: str, doc: dict, reason: str, now: float) -> dict:
        if action == "pause":
            if plan.state == "paused":
                raise RolloutError(f"rollout {plan.rollout_id} is paused already", 409)
            return {"state": "paused", "reason": reason}
        if action == "resume":
            if plan.state != "paused":
                raise RolloutError(f"rollout {plan.rollout_id} is {plan.state}, not paused", 409)
            # The halt criteria start afresh: an automatic halt's evidence only grows, so without
            # this a resume would trip again on the very failures the operator has looked at.
            # Whole seconds, rounded up: an event stamped in the second of the resume came before it.
            return {"state": "active", "reason": doc.get("reason") or "", "halt_since": utc_timestamp(math.ceil(now))}
        if action == "abort":
            return {"state": "aborted", "reason": reason}
        phase = doc["phase"] if "phase" in doc else _next_gate(plan)
        if not isinstance(phase, int) or isinstance(phase, bool) or not 0 <= phase < len(plan.phases):
            raise RolloutError(f"'phase' must be a phase index 0 to {len(plan.phases) - 1}")
        if phase <= plan.approved_phase:
            raise RolloutError(f"phase {phase} is approved already (approved_phase {plan.approved_phase})", 409)
        return {"approved_phase": phase, "reason": doc.get("reason") or plan.reason}

    def _plan(self, rollout_id: str) -> Plan:
        latest = self.store.latest_revision(rollout_id)
        if latest is None:
            raise RolloutError(f"no rollout {rollout_id[:64]!r}", 404)
        return parse_plan(latest.plan)

    def _issue(self, plan: Plan, actor: str, now: float, halt_phase: int | None = None) -> StoredRevision:
        if self.key is None:
            raise RolloutError("rollouts are disabled: ROLLOUT_KEY is not set", 503)
        signed = sign_plan(plan, self.key)
        revision = StoredRevision(plan.rollout_id, plan.revision, plan.state, plan.expires_epoch, signed.data,
                                  signed.bundle, now, actor, halt_phase)
        try:
            self.store.add_revision(revision)
        except RevisionConflict as exc:
            raise RolloutError(str(exc), 409) from None
        log.info("rollout %s revision %d: %s by %s%s", plan.rollout_id, plan.revision, plan.state, actor,
                 f" ({plan.reason})" if plan.reason else "")
        return revision

    # -- what gateways read (Wire 1) and send (Wire 4) ---------------------------------

    def served(self, now: float) -> dict:
        """The latest revision of every plan that has not expired, signed (aborted ones too)."""
        return {"plans": [{"plan": r.plan.decode("ascii"), "bundle": json.loads(r.bundle)}
                          for r in self.store.latest_revisions() if r.expires > now]}

    def site_report(self, gateway: str, doc: Any) -> None:
        report = parse_site_report(doc, gateway)
        if self.store.latest_revision(report["rollout_id"]) is None:
            raise RolloutError(f"no rollout {report['rollout_id']!r}", 404)
        self.store.put_site_report(report["rollout_id"], gateway, report["revision"], json.dumps(report, sort_keys=True))

    # -- fleet-wide halts ----------------------------------------------------------------

    def evidence_stored(self, rows: list[dict]) -> None:
        """POST /metrics stored these rows: wake the fleet-halt worker if any is a rollout event
        (a rollback or blacklist can breach max_failures; a commit can complete min_attempts)."""
        if any("rollout_id" in row["record"] for row in rows):
            self._evidence.set()

    def wait_for_evidence(self, timeout: float) -> None:
        """Sleep until new rollout events are stored (or `wake`), at most `timeout` (install timeouts
        and expiry need no event). Cleared on return: events stored while check_fleet runs wake the next wait."""
        self._evidence.wait(timeout)
        self._evidence.clear()

    def wake(self) -> None:
        self._evidence.set()

    def check_fleet(self, now: float) -> list[StoredRevision]:
        """Halt every active plan whose fleet criteria its events breach; the revisions issued.

        One plan that cannot be judged (a store row damaged by hand, say) is logged and
        skipped: it must not keep the other rollouts from halting."""
        issued = []
        for latest in self.store.latest_revisions():
            if latest.state != "active" or latest.expires <= now:
                continue
            try:
                revision = self._halt_if_breached(latest, now)
            except Exception as exc:
                log.error("rollout %s: fleet-wide check failed: %s: %s", latest.rollout_id, type(exc).__name__, exc)
                continue
            if revision is not None:
                issued.append(revision)
        return issued

    def _halt_if_breached(self, latest: StoredRevision, now: float) -> StoredRevision | None:
        plan = parse_plan(latest.plan)
        halt = progress.find_halt(plan, len(plan.phases), self.evidence(plan, now, since=plan.halt_since_epoch), None)
        if halt is None:
            return None
        try:
            revision = self._issue(revise(plan, state=halt.state, reason=halt.reason[:200]), FLEET_ACTOR, now, halt.phase)
        except RolloutError as exc:  # an operator's revision came first: judge that one next time
            log.info("rollout %s: fleet halt deferred: %s", plan.rollout_id, exc)
            return None
        log.warning("rollout %s revision %d phase %d halted fleet-wide (%s): %s", plan.rollout_id,
                    revision.revision, halt.phase, halt.state, halt.reason)
        return revision

    def evidence(self, plan: Plan, now: float, since: float = 0.0) -> progress.Evidence:
        """`since`: only outcomes from then on (the halt check passes the plan's halt_since)."""
        return progress.count(plan, self.store.rollout_attempts(plan.rollout_id, since), now)

    # -- status -----------------------------------------------------------------------------

    def overview(self, now: float, in_progress: bool = False) -> list[dict]:
        """Every rollout's brief status; `in_progress`: only those neither aborted nor expired
        (/status), left out before their status is computed: finished rollouts pile up."""
        return [self.status(r.rollout_id, now, brief=True) for r in self.store.latest_revisions()
                if not in_progress or (r.state != "aborted" and r.expires > now)]

    def status(self, rollout_id: str, now: float, brief: bool = False) -> dict:
        revisions = self.store.revisions(rollout_id)
        if not revisions:
            raise RolloutError(f"no rollout {rollout_id[:64]!r}", 404)
        plan = parse_plan(revisions[-1].plan)
        doc = rollout_status(plan, revisions, self.evidence(plan, now), self.store.robot_versions(),
                             self.store.site_reports(rollout_id), now, brief, self.cohorts.lookup(plan))
        if not brief:  # the site view (issue 16) of the sites this rollout concerns
            sites = set(doc["phases"][0]["sites"]) if doc["phases"] else set()
            doc["site_orchestration"] = site_views(self.store.site_views(), now, sites)
        return doc


def parse_site_report(doc: Any, gateway: str) -> dict:
    """Wire 4's body, checked field by field; the cleaned report."""
    if not isinstance(doc, dict):
        raise RolloutError("body must be a JSON object")
    unknown = set(doc) - {"site", "rollout_id", "revision", "phases", "halted"}
    if unknown:
        raise RolloutError(f"unknown field {sorted(unknown)[0][:40]!r}")
    if doc.get("site") != gateway:
        raise RolloutError(f"token is for gateway {gateway}, body says site {str(doc.get('site'))[:64]!r}", 403)
    rollout_id, revision, phases = doc.get("rollout_id"), doc.get("revision"), doc.get("phases")
    if not isinstance(rollout_id, str) or not ROLLOUT_ID.fullmatch(rollout_id):
        raise RolloutError("'rollout_id' is missing or invalid")
    if not _whole(revision) or revision < 1:
        raise RolloutError("'revision' must be a whole number >= 1")
    if not isinstance(phases, list) or len(phases) > 16:
        raise RolloutError("'phases' must be a list of at most 16 phases")
    return {"site": gateway, "rollout_id": rollout_id, "revision": revision,
            "phases": [_site_phase(p, n) for n, p in enumerate(phases)], "halted": _halted(doc.get("halted"))}


def _site_phase(doc: Any, n: int) -> dict:
    where = f"phases[{n}]"
    if not isinstance(doc, dict) or set(doc) - {"index", "started_at", "halted_at", "reason", "counts"}:
        raise RolloutError(f"{where} must be an object of index, started_at, halted_at, reason, counts")
    if not _whole(doc.get("index")) or not 0 <= doc["index"] < 16:
        raise RolloutError(f"{where}: 'index' must be 0 to 15")
    for key in ("started_at", "halted_at"):
        if doc.get(key) is not None and not _time(doc[key]):
            raise RolloutError(f"{where}: {key!r} must be a time in seconds or null")
    counts = doc.get("counts", {})
    if (not isinstance(counts, dict) or set(counts) - {"attempts", "committed", "failed"}
            or not all(_whole(v) and 0 <= v < 2**31 for v in counts.values())):
        raise RolloutError(f"{where}: 'counts' must map attempts, committed, failed to whole numbers")
    return {"index": doc["index"], "started_at": doc.get("started_at"), "halted_at": doc.get("halted_at"),
            "reason": _line(doc.get("reason", ""), where), "counts": counts}


def _halted(doc: Any) -> dict | None:
    if doc is None:
        return None
    if not isinstance(doc, dict) or set(doc) - {"at", "reason"} or not _time(doc.get("at")):
        raise RolloutError("'halted' must be null or {\"at\": seconds, \"reason\": \"...\"}")
    return {"at": doc["at"], "reason": _line(doc.get("reason", ""), "halted")}


def _line(text: Any, where: str) -> str:
    if not isinstance(text, str) or len(text) > 300 or not text.isprintable():
        raise RolloutError(f"{where}: 'reason' must be one printable line of at most 300 characters")
    return text


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _time(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e11


def _next_gate(plan: Plan) -> int:
    """The phase an approval without {"phase": N} opens: the first gated one not yet approved.

    A gate is a phase whose predecessor says advance=approve; approving "the next phase"
    must mean that gate, not approved_phase + 1 (which may be a phase that starts by itself)."""
    for n in range(plan.approved_phase + 1, len(plan.phases)):
        if plan.phases[n - 1].advance == "approve":
            return n
    raise RolloutError(f"no phase of rollout {plan.rollout_id} waits for an approval "
                       f"(approved_phase {plan.approved_phase})", 409)
