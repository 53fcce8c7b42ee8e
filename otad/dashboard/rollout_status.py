"""A rollout's status document: per phase and per site, what the operator sees (API, CLI, page).

Counts come from otad.rollout.progress.count (each robot once, by its outcome);
"targeted" from otad.rollout.cohort (the robots the dashboard has heard of,
by their phase and their reported version). `waiting` is targeted robots of
the phase with no event yet. Halts are the dashboard's own fleet-wide
revisions and what sites reported deciding (Wire 4).
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Callable, Iterable

from otad.dashboard.rollout_store import StoredRevision
from otad.rollout import cohort
from otad.rollout.plan import Plan
from otad.rollout.progress import Counts, Evidence

FLEET_ACTOR = "fleet halt"


class CohortCache:
    """Each robot's phase under a plan's cohorts (cohort.phase_of), computed once per robot and kept.

    A robot's phase depends only on the rollout_id, the phases' named robots and percentages, and its
    own id, which is what the table is keyed on, so it never goes stale: a revision that changed the
    phases would get a table of its own. `limit` plans are kept, the least recently used dropped.
    Safe across threads (the GIL makes each dict step atomic; a race only computes a phase twice)."""

    def __init__(self, limit: int = 16) -> None:
        self.limit = limit
        self._plans: OrderedDict[tuple, dict[str, int | None]] = OrderedDict()
        self._lock = threading.Lock()

    def lookup(self, plan: Plan) -> Callable[[str], int | None]:
        key = (plan.rollout_id, tuple((phase.robots, phase.percent) for phase in plan.phases))
        with self._lock:
            known = self._plans.pop(key, None)
            self._plans[key] = known = {} if known is None else known
            while len(self._plans) > self.limit:
                self._plans.popitem(last=False)

        def phase(robot_id: str) -> int | None:
            if robot_id not in known:
                known[robot_id] = cohort.phase_of(plan, robot_id)
            return known[robot_id]
        return phase


def rollout_status(plan: Plan, revisions: list[StoredRevision], evidence: Evidence, robots: Iterable[dict],
                   reports: list[dict], now: float, brief: bool = False,
                   phase_of: Callable[[str], int | None] | None = None) -> dict:
    """`phase_of`: a robot's phase under this plan (default cohort.phase_of; CohortCache.lookup keeps them)."""
    targeted = _targeted(plan, robots, phase_of or (lambda robot_id: cohort.phase_of(plan, robot_id)))
    sites = sorted(set(evidence.sites) | {site for site, _ in targeted} | {r["gateway_id"] for r in reports})
    phases = []
    for n, phase in enumerate(plan.phases):
        per_site = {site: _row(targeted.get((site, n), 0), evidence.sites.get(site, {}).get(n)) for site in sites}
        row = _row(sum(r["targeted"] for r in per_site.values()), evidence.fleet.get(n))
        phases.append({"index": n, "percent": phase.percent, "robots": list(phase.robots), "min_soak_s": phase.min_soak_s,
                       "advance": phase.advance, **row, "sites": per_site})
    halts = _halts(plan, revisions, evidence, reports)
    for halt in halts:
        phases[halt["phase"]]["halted"] = True
        for site in halt["sites"]:
            if site in phases[halt["phase"]]["sites"]:
                phases[halt["phase"]]["sites"][site]["halted"] = True
    latest = revisions[-1]
    doc = {"rollout_id": plan.rollout_id, "revision": plan.revision, "state": plan.state, "reason": plan.reason,
           "version": plan.version, "from": list(plan.from_versions), "expires": plan.expires,
           "expired": latest.expires <= now, "on_halt": plan.on_halt, "offline_policy": plan.offline_policy,
           "approved_phase": plan.approved_phase, "issued": latest.issued, "issued_by": latest.actor,
           "phases": phases, "halts": halts}
    if not brief:
        doc["revisions"] = [{"revision": r.revision, "state": r.state, "issued": r.issued, "actor": r.actor,
                             "reason": json.loads(r.plan)["reason"]} for r in revisions]
        doc["site_reports"] = {r["gateway_id"]: {**json.loads(r["body"]), "received": r["received"]} for r in reports}
    return doc


def _targeted(plan: Plan, robots: Iterable[dict], phase_of: Callable[[str], int | None]) -> dict[tuple[str, int], int]:
    counts: dict[tuple[str, int], int] = {}
    targeted: dict[str, bool] = {}  # per version: a fleet reports a handful of versions, not one per robot
    for robot in robots:
        version = robot["version"]
        if version not in targeted:
            targeted[version] = cohort.is_targeted(plan, version or None)
        phase = phase_of(robot["robot_id"]) if targeted[version] else None
        if phase is not None:
            key = (robot["gateway_id"], phase)
            counts[key] = counts.get(key, 0) + 1
    return counts


def _row(targeted: int, counts: Counts | None) -> dict:
    counts = counts or Counts()
    seen = counts.installing + counts.committed + counts.failed
    return {"targeted": max(targeted, seen), "waiting": max(0, targeted - seen), "installing": counts.installing,
            "committed": counts.committed, "failed": counts.failed, "halted": False}


def _halts(plan: Plan, revisions: list[StoredRevision], evidence: Evidence, reports: list[dict]) -> list[dict]:
    halts = []
    for revision in revisions:
        if revision.actor == FLEET_ACTOR and revision.halt_phase is not None and revision.halt_phase < len(plan.phases):
            failing = sorted(site for site, table in evidence.sites.items()
                             if table.get(revision.halt_phase, Counts()).failed)
            halts.append({"scope": "fleet", "phase": revision.halt_phase, "revision": revision.revision,
                          "state": revision.state, "reason": json.loads(revision.plan)["reason"], "at": revision.issued,
                          "sites": failing})
    for report in reports:
        body = json.loads(report["body"])
        for phase in body["phases"]:
            if phase["halted_at"] is not None and phase["index"] < len(plan.phases):
                halts.append({"scope": "site", "phase": phase["index"], "revision": body["revision"], "state": "halted",
                              "reason": phase["reason"], "at": phase["halted_at"], "sites": [report["gateway_id"]]})
    return sorted(halts, key=lambda h: h["at"])
