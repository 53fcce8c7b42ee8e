"""GET /status (HTML) and /status.json: the fleet at a glance, from the telemetry store.

Server-rendered, no external assets, refreshing itself every 10 s.
"""
from __future__ import annotations

import html
import json
import time

STALE_AFTER = 120  # seconds without a record before a robot or gateway shows as silent


def status_document(summary: dict, now: float) -> dict:
    events = []
    for event in summary["events"]:
        body = json.loads(event["body"])
        events.append({**{k: v for k, v in event.items() if k != "body"}, **body})
    return {
        "generated": now,
        "gateways": [{**g, "age_s": round(now - g["last_seen"], 1)} for g in summary["gateways"]],
        "robots": [{**r, "age_s": round(now - r["last_seen"], 1)} for r in summary["robots"]],
        "events": events,
        "versions": summary["versions"],
    }


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _cells(*values: object, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<tr{attr}>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in values) + "</tr>"


def render_status(doc: dict) -> bytes:
    gateways = "".join(
        _cells(g["gateway_id"], _age(g["age_s"]), f"{g['backlog']:,}", g["dropped"], cls="stale" if g["age_s"] > STALE_AFTER else "")
        for g in doc["gateways"]
    ) or "<tr><td colspan=4>no gateway has reported yet</td></tr>"
    robots = "".join(
        _cells(r["robot_id"], r["gateway_id"], r["version"] or "?", r["health"] or "?",
               "" if r["cpu"] is None else f"{r['cpu']:.0f}%", "" if r["mem"] is None else f"{r['mem']:.0f}%",
               _age(r["age_s"]), f"{r['records']:,}",
               cls=" ".join(c for c in ("bad" if r["health"] == "failed" else "warn" if r["health"] == "degraded" else "",
                                        "stale" if r["age_s"] > STALE_AFTER else "") if c))
        for r in doc["robots"]
    ) or "<tr><td colspan=8>no robot has reported yet</td></tr>"
    events = "".join(
        _cells(e["ts"], e.get("robot_id") or e.get("gateway_id"), e.get("event", e["type"]), e.get("version", ""),
               e.get("detail") or (f"{e['dropped']} metrics dropped by the gateway buffer" if e["type"] == "gap" else ""),
               cls="bad" if e.get("event") in ("rolled_back", "blacklisted", "rejected") or e["type"] == "gap" else "")
        for e in doc["events"]
    ) or "<tr><td colspan=5>no events yet</td></tr>"
    versions = "".join(_cells(v, n) for v, n in sorted(doc["versions"].items()))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="10"><title>otad fleet status</title>
<style>
body{{font-family:system-ui,sans-serif;margin:1rem;color:#222}} table{{border-collapse:collapse;margin-bottom:1.5rem;width:100%}}
th,td{{text-align:left;padding:.3rem .6rem;border-bottom:1px solid #ddd}} .bad{{background:#fde2e1}} .warn{{background:#fff4d6}}
.stale td{{color:#999}} h2{{font-size:1.1rem;margin-top:1.5rem}}
</style></head><body>
<h1>otad fleet status</h1><p>Updated {html.escape(time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(doc['generated'])))}</p>
<h2>Versions</h2><table><tr><th>version</th><th>robots</th></tr>{versions}</table>
<h2>Robots</h2><table><tr><th>robot</th><th>gateway</th><th>version</th><th>health</th><th>CPU</th><th>memory</th><th>last seen</th><th>records</th></tr>{robots}</table>
<h2>Gateways</h2><table><tr><th>gateway</th><th>last seen</th><th>backlog</th><th>metrics dropped</th></tr>{gateways}</table>
<h2>Recent update events</h2><table><tr><th>time</th><th>robot</th><th>event</th><th>version</th><th>detail</th></tr>{events}</table>
</body></html>
"""
    return page.encode("utf-8")
