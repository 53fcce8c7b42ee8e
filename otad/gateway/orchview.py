"""What the site's orchestrator shows: the site view (`snapshot`, docs/formats.md "Site
orchestration snapshot", sent to the dashboard) and the gateway's STATUS= text.

The budget and window shown are those of the first robot in line (holders of a
lease first, then the queue): with a plan that overrides SITE_MAX_CONCURRENT or
MAINTENANCE_WINDOWS, that is what the site is working under now.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from otad.gateway.orchestrator import Orchestrator, Policy


def _first_policy(orch: "Orchestrator") -> "Policy":
    table, versions = orch.table, orch.installs.versions
    line = [l.robot_id for l in sorted(table.leases.values(), key=lambda l: l.lease_id)] + [w.robot_id for w in table.order()]
    return orch.policy(versions.get(line[0]) if line else None)


def snapshot(orch: "Orchestrator", now: float) -> dict:
    """The site view, exactly the schema of docs/formats.md (h-orch-dash's parser reads it)."""
    with orch.lock:
        table, versions, cfg = orch.table, orch.installs.versions, orch.settings
        policy = _first_policy(orch)
        window = orch.window(policy.windows, now, expected=0)
        return {
            "site": cfg.site, "at": int(now), "timezone": cfg.timezone.key,
            "budget": {"limit": "" if policy.source == "none" else str(policy.limit), "source": policy.source,
                       "slots": policy.limit.slots(orch.site_robots), "in_use": len(table.leases)},
            "window": {"spec": policy.windows.text if policy.windows is not None else "", "open": window.ok,
                       "reason": window.reason},
            "updating": [{"robot": l.robot_id, "lease": l.lease_id, "version": versions.get(l.robot_id, ""),
                          "since": int(l.granted_at), "expires_at": int(l.expires_at)}
                         for l in sorted(table.leases.values(), key=lambda l: l.lease_id)],
            "waiting": [{"robot": w.robot_id, "ahead": n, "version": versions.get(w.robot_id, ""), "since": int(w.since),
                         "reason": orch.said.get(w.robot_id, "")} for n, w in enumerate(table.order())],
            "deferred": [{"robot": robot, "since": int(d.since), "reason": d.reason, "too_long": d.too_long}
                         for robot, d in sorted(orch.deferred.items())],
            "install_estimate_s": round(orch.install_estimate(), 1),
        }


def status(orch: "Orchestrator", now: float) -> str:
    """`leases 1/2 in use, 3 waiting`, plus `window closed until 22:00` while it is."""
    with orch.lock:
        policy = _first_policy(orch)
        in_use, waiting, deferred = len(orch.table.leases), len(orch.table.queue), len(orch.deferred)
        budget = f"{in_use} in use (no limit)" if policy.source == "none" else \
            f"{in_use}/{policy.limit.slots(orch.site_robots)} in use"
        text = f"leases {budget}, {waiting} waiting" + (f", {deferred} deferred" if deferred else "")
        window = orch.window(policy.windows, now, expected=0)
        if not window.ok:
            text += ", window closed " + window.reason.removeprefix("outside window ")
        return text
