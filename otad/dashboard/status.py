"""GET /status (HTML) and /status.json: the fleet at a glance, from the telemetry store.

`fleet_status` builds one document; /status.json is that document and /status
draws exactly it, so the page never shows what the JSON does not carry.
Server-rendered, inline SVG (otad.dashboard.charts), no external assets,
refreshing itself every 10 s. Everything from robots and gateways is
untrusted text and is escaped where it meets the markup. The site view's cards
(issue 16) are drawn by site_view.py from the document's `site_orchestration`.

Derived states (docs/operations.md, "The status page"):
- a robot is *silent* when nothing from it arrived for STALE_AFTER seconds;
- a gateway's WAN is *up* when its last contact is at most WAN_UP_WITHIN seconds
  old (a gateway with reporting robots forwards every few seconds), *late* up to
  STALE_AFTER, *down* beyond. The dashboard cannot see the WAN itself; silence is its evidence.
"""
from __future__ import annotations

import json
import re
import time
from html import escape

from otad.dashboard.site_view import CSS as SITE_VIEW_CSS, render_site_views
from otad.dashboard.charts import EVENT_STYLE, donut, event_mark, sparkline, version_colors
from otad.dashboard.store import TelemetryStore
from otad.errors import OtadError
from otad.semver import Version

STALE_AFTER = 120
WAN_UP_WITHIN = 30
WINDOW_S = 3600  # the charts cover at most the last hour
MIN_WINDOW_S = 60
POINTS = 60  # buckets per chart
TIMELINE_LANES = 12
BAD_EVENTS = ("rolled_back", "blacklisted", "rejected")
REFRESH_S = 10
RFC3339 = re.compile(r"(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d)(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)$")


# -- the document -------------------------------------------------------------------------


def fleet_status(store: TelemetryStore, now: float) -> dict:
    summary = store.summary()
    histories = {r["robot_id"]: store.history(r["robot_id"], now - WINDOW_S) for r in summary["robots"]}
    return status_document(summary, now, histories)


def status_document(summary: dict, now: float, histories: dict[str, list[dict]] | None = None) -> dict:
    histories = histories or {}
    oldest = min((rows[0]["received"] for rows in histories.values() if rows), default=now)
    start = max(now - WINDOW_S, min(oldest, now - MIN_WINDOW_S))
    robots = [_robot(r, now, start, histories.get(r["robot_id"], [])) for r in summary["robots"]]
    gateways = [_gateway(g, now, robots) for g in summary["gateways"]]
    events = []
    for event in summary["events"]:
        body = json.loads(event["body"])
        events.append({**{k: v for k, v in event.items() if k != "body"}, **body})
    versions = summary["versions"]
    return {
        "generated": now,
        "window": {"start": round(start, 1), "end": round(now, 1), "points": POINTS},
        "totals": _totals(robots, gateways, events),
        "version_order": _version_order(versions),
        "versions": versions,
        "gateways": gateways,
        "robots": robots,
        "events": events,
    }


def _robot(robot: dict, now: float, start: float, history: list[dict]) -> dict:
    age = round(now - robot["last_seen"], 1)
    state = "silent" if age > STALE_AFTER else (robot["health"] or "unknown")
    cpu, mem = _series(history, start, now)
    return {**robot, "age_s": age, "state": state, "cpu_series": cpu, "mem_series": mem}


def _series(history: list[dict], start: float, end: float) -> tuple[list, list]:
    """Per-bucket means of CPU and memory across [start, end]; None where nothing arrived."""
    step = (end - start) / POINTS
    sums = [[0.0, 0.0, 0] for _ in range(POINTS)]
    for row in history:
        index = min(int((row["received"] - start) / step), POINTS - 1) if step > 0 else POINTS - 1
        if index < 0:
            continue
        body = json.loads(row["body"])
        bucket = sums[index]
        bucket[0] += body.get("cpu", 0.0)
        bucket[1] += body.get("mem", 0.0)
        bucket[2] += 1
    cpu = [round(s[0] / s[2], 1) if s[2] else None for s in sums]
    mem = [round(s[1] / s[2], 1) if s[2] else None for s in sums]
    return cpu, mem


def _gateway(gateway: dict, now: float, robots: list[dict]) -> dict:
    age = round(now - gateway["last_seen"], 1)
    wan = "up" if age <= WAN_UP_WITHIN else "late" if age <= STALE_AFTER else "down"
    members = [r["robot_id"] for r in robots if r["gateway_id"] == gateway["gateway_id"]]
    return {**gateway, "age_s": age, "wan": wan, "robots": members}


def _totals(robots: list[dict], gateways: list[dict], events: list[dict]) -> dict:
    states: dict[str, int] = {}
    for robot in robots:
        states[robot["state"]] = states.get(robot["state"], 0) + 1
    kinds: dict[str, int] = {}
    for event in events:
        kind = event.get("event", event["type"])
        kinds[kind] = kinds.get(kind, 0) + 1
    wan: dict[str, int] = {}
    for gateway in gateways:
        wan[gateway["wan"]] = wan.get(gateway["wan"], 0) + 1
    return {"robots": len(robots), "states": states, "gateways": len(gateways), "wan": wan,
            "backlog": sum(g["backlog"] for g in gateways), "events": kinds,
            # Records lost, by where: robots' spools (reported by the agents) and gateway buffers.
            "dropped": {"agent": sum(r.get("dropped_agent", 0) for r in robots),
                        "gateway": sum(g.get("dropped", 0) for g in gateways)}}


def _version_order(versions: dict[str, int]) -> list[str]:
    """Newest first; what is not a release version ("unknown", garbage) goes last."""
    releases, others = [], []
    for version in versions:
        try:
            releases.append((Version(version), version))
        except (OtadError, ValueError):
            others.append(version)
    return [v for _, v in sorted(releases, reverse=True)] + sorted(others)


# -- the page -----------------------------------------------------------------------------


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{max(0, seconds):.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def _when(ts: str) -> str:
    """An RFC 3339 time as `2026-11-26 10:00:05`; anything else as it came."""
    match = RFC3339.match(ts)
    return f"{match[1]} {match[2]}" if match else ts


def _span(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def _td(label: str, content: str, cls: str = "") -> str:
    """A cell whose label shows beside it when the table is stacked on a phone."""
    attr = f' class="{cls}"' if cls else ""
    return f'<td data-label="{escape(label)}"{attr}>{content}</td>'


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _robot_row(robot: dict, colors: dict[str, str], span: str) -> str:
    version = robot["version"] or "unknown"
    state = robot["state"]
    cpu = sparkline(robot["cpu_series"], f"CPU of {robot['robot_id']}, last {span}", color="#0072b2")
    mem = sparkline(robot["mem_series"], f"memory of {robot['robot_id']}, last {span}", color="#cc79a7")
    return (
        f'<tr class="robot state-{escape(state)}">'
        + _td("robot", escape(robot["robot_id"]) + _lost(robot), "id")
        + _td("version", f'<span class="chip" style="--c:{colors.get(version, "#999")}">{escape(version)}</span>', "version")
        + _td("health", f'<span class="badge {escape(state)}">{escape(state)}</span>', "health")
        + _td("CPU", f'{cpu}<span class="now">{_percent(robot["cpu"])}</span>', "cpu")
        + _td("memory", f'{mem}<span class="now">{_percent(robot["mem"])}</span>', "mem")
        + _td("last seen", escape(_age(robot["age_s"])), "seen")
        + "</tr>"
    )


def _lost(robot: dict) -> str:
    agent, gateway = robot.get("dropped_agent", 0), robot.get("dropped_gateway", 0)
    if not agent and not gateway:
        return ""
    return (f' <small class="lost" title="records lost: {agent:,} in its spool, {gateway:,} at gateways">'
            f'{agent + gateway:,} lost</small>')


def _gateway_card(gateway: dict, robots: list[dict], colors: dict[str, str], span: str) -> str:
    rows = "".join(_robot_row(r, colors, span) for r in robots) or '<tr><td colspan="6">no robot has reported yet</td></tr>'
    wan = gateway["wan"]
    return (
        f'<article class="card gateway"><header><h3>{escape(gateway["gateway_id"])}</h3>'
        f'<span class="badge wan-{escape(wan)}">WAN {escape(wan)}</span></header>'
        f'<p class="facts"><span><b class="backlog">{gateway["backlog"]:,}</b> records waiting at the gateway</span>'
        f'<span><b>{gateway["dropped"]:,}</b> records dropped here</span>'
        f'<span><b>{gateway.get("dropped_agent", 0):,}</b> dropped by its robots\' spools</span>'
        + (f'<span><b class="bad">{gateway["quarantined"]:,}</b> records quarantined at the gateway</span>'
           if gateway.get("quarantined") else "") +
        f'<span>last contact <b class="contact">{escape(_age(gateway["age_s"]))}</b></span>'
        f'<span><b>{len(robots)}</b> robots</span></p>'
        '<table class="robots"><thead><tr><th>robot</th><th>version</th><th>health</th>'
        f'<th>CPU, last {escape(span)}</th><th>memory, last {escape(span)}</th><th>last seen</th></tr></thead>'
        f"<tbody>{rows}</tbody></table></article>"
    )


def _versions_card(doc: dict, colors: dict[str, str]) -> str:
    total = sum(doc["versions"].values())
    slices = [(v, doc["versions"][v], colors[v]) for v in doc["version_order"]]
    items = "".join(
        f'<li class="version"><span class="swatch" style="background:{color}"></span>'
        f'<span class="v">{escape(v)}</span><span class="n">{n}</span>'
        f'<span class="pct">{100 * n / total:.0f}%</span></li>'
        for v, n, color in slices)
    label = f"{total} robots" if total != 1 else "1 robot"
    return (f'<section class="card versions"><h2>Versions</h2><div class="split">{donut(slices, label=label)}'
            f'<ul class="legend">{items or "<li>no robot has reported yet</li>"}</ul></div></section>')


def _tiles(doc: dict) -> str:
    totals = doc["totals"]
    states, wan, kinds = totals["states"], totals["wan"], totals["events"]
    newest = doc["version_order"][0] if doc["version_order"] else "-"
    tiles = [
        ("robots", totals["robots"], " · ".join(f"{states.get(s, 0)} {s}" for s in ("ok", "degraded", "failed", "silent"))),
        ("gateways", totals["gateways"], " · ".join(f"{wan.get(s, 0)} WAN {s}" for s in ("up", "late", "down"))),
        ("newest version", newest, f"{len(doc['versions'])} version{'' if len(doc['versions']) == 1 else 's'} in the fleet"),
        ("rollbacks", kinds.get("rolled_back", 0), f"{kinds.get('blacklisted', 0)} blacklisted · {kinds.get('installed', 0)} installed"),
        ("telemetry backlog", f"{totals['backlog']:,}", "records waiting at gateways"),
    ]
    alert = {"robots": states.get("failed", 0) + states.get("silent", 0), "gateways": wan.get("down", 0) + wan.get("late", 0),
             "rollbacks": kinds.get("rolled_back", 0)}
    return '<section class="tiles">' + "".join(
        f'<div class="tile{" alert" if alert.get(name) else ""}"><span class="k">{escape(name)}</span>'
        f'<span class="big">{escape(str(value))}</span><span class="sub">{escape(sub)}</span></div>'
        for name, value, sub in tiles) + "</section>"


def _timeline(doc: dict) -> str:
    start, end = doc["window"]["start"], doc["window"]["end"]
    width = max(end - start, 1.0)
    lanes: dict[str, list[str]] = {}
    last_left: dict[str, float] = {}
    nudges: dict[str, int] = {}
    for event in doc["events"]:
        received = event.get("received")
        if received is None or received < start:
            continue
        lane = event.get("robot_id") or f"gateway {event.get('gateway_id', '')}"
        if lane not in lanes and len(lanes) >= TIMELINE_LANES:
            continue
        kind = event.get("event", event["type"])
        title = f"{lane}: {kind} {event.get('version', '')} at {event['ts']}"
        left = 100 * min(max(received - start, 0), width) / width
        marks = lanes.setdefault(lane, [])
        # Events are newest first; one that lands on a later one's spot steps left, so both show.
        nudge = nudges.get(lane, 0) + 1 if lane in last_left and last_left[lane] - left < 3 else 0
        nudges[lane], last_left[lane] = nudge, left
        marks.append(f'<span class="tick k-{escape(kind)}" style="left:{left:.2f}%;--n:{nudge}">'
                     f"{event_mark(kind, title)}</span>")
    if not lanes:
        return f'<p class="muted">no update events in the last {escape(_span(width))}</p>'
    rows = "".join(f'<div class="lane"><span class="lane-name">{escape(name)}</span><div class="track">{"".join(marks)}</div></div>'
                   for name, marks in sorted(lanes.items()))
    legend = "".join(f'<span>{event_mark(kind, kind)} {escape(kind.replace("_", " "))}</span>' for kind in EVENT_STYLE)
    return (f'<div class="timeline">{rows}<div class="axis"><span>{escape(_span(width))} ago</span><span>now</span></div></div>'
            f'<p class="marks-legend">{legend}</p>')


def _loss_detail(event: dict) -> str:
    if event["type"] == "dropped":
        return f"{event['dropped']} metrics dropped by the robot's full spool"
    if event["type"] != "gap":
        return ""
    whose = ", ".join(f"{robot} {n}" for robot, n in sorted(event.get("robots", {}).items()))
    return f"{event['dropped']} metrics dropped by the full gateway buffer" + (f": {whose}" if whose else "")


def _event_rows(doc: dict) -> str:
    rows = []
    for event in doc["events"]:
        kind = event.get("event", event["type"])
        detail = event.get("detail") or _loss_detail(event)
        bad = kind in BAD_EVENTS or event["type"] in ("gap", "dropped")
        rows.append(
            ('<tr class="bad">' if bad else "<tr>")
            + _td("time", escape(_when(str(event["ts"]))), "time")
            + _td("robot", escape(str(event.get("robot_id") or event.get("gateway_id") or "")), "id")
            + _td("event", f'<span class="ev k-{escape(kind)}">{event_mark(kind, kind)} {escape(kind)}</span>', "event")
            + _td("version", escape(str(event.get("version", ""))), "version")
            + _td("detail", escape(str(detail)), "detail")
            + "</tr>")
    return "".join(rows) or '<tr><td colspan="5">no events yet</td></tr>'


def _rollouts_card(doc: dict) -> str:
    """The rollouts in progress (active or paused), each linking to its console page."""
    items = []
    for r in doc.get("rollouts", []):
        committed = sum(p["committed"] for p in r["phases"])
        targeted = sum(p["targeted"] for p in r["phases"])
        failed = sum(p["failed"] for p in r["phases"])
        items.append(f'<li class="rollout"><a href="/rollouts/{escape(r["rollout_id"])}">{escape(r["rollout_id"])}</a> '
                     f'→ <b>{escape(r["version"])}</b> <span class="badge st-{escape(r["state"])}">{escape(r["state"])}</span> '
                     f'<span class="muted">revision {r["revision"]} · {committed}/{targeted} committed · {failed} failed'
                     f'{" · " + escape(r["reason"]) if r["reason"] else ""}</span></li>')
    if not items:
        return ""
    return f'<section class="card rollouts"><h2>Rollouts in progress</h2><ul class="rollout-list">{"".join(items)}</ul></section>'


def render_status(doc: dict) -> bytes:
    colors = version_colors(doc["version_order"])
    span = _span(doc["window"]["end"] - doc["window"]["start"])
    by_gateway: dict[str, list[dict]] = {}
    for robot in doc["robots"]:
        by_gateway.setdefault(robot["gateway_id"], []).append(robot)
    known = {g["gateway_id"] for g in doc["gateways"]}
    cards = [_gateway_card(g, by_gateway.get(g["gateway_id"], []), colors, span) for g in doc["gateways"]]
    for gateway_id in sorted(set(by_gateway) - known):  # robots whose gateway row is missing (should not happen)
        stub = {"gateway_id": gateway_id, "wan": "unknown", "backlog": 0, "dropped": 0, "age_s": 0.0}
        cards.append(_gateway_card(stub, by_gateway[gateway_id], colors, span))
    updated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(doc["generated"]))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{REFRESH_S}"><title>otad fleet status</title><style>{CSS}</style></head><body>
<header class="top"><h1>otad fleet status</h1><p>updated {escape(updated)} · refreshes every {REFRESH_S} s ·
<a href="status.json">status.json</a></p></header><main>
{_tiles(doc)}
{_rollouts_card(doc)}
{render_site_views(doc.get("site_orchestration", []))}
<div class="row">{_versions_card(doc, colors)}
<section class="card events"><h2>Update events</h2>{_timeline(doc)}</section></div>
<h2 class="section">Gateways and their robots</h2>
{"".join(cards) or '<p class="card muted">no gateway has reported yet</p>'}
<section class="card"><h2>Recent update events</h2><table class="event-list"><thead><tr><th>time</th><th>robot</th><th>event</th>
<th>version</th><th>detail</th></tr></thead><tbody>{_event_rows(doc)}</tbody></table></section>
</main></body></html>
"""
    return page.encode("utf-8")


CSS = """
:root{--bg:#f3f4f7;--card:#fff;--ink:#1d2330;--muted:#667085;--line:#e4e7ec;--bad:#fde2e1;--badink:#b42318}
*{box-sizing:border-box}body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;background:var(--bg);color:var(--ink)}
.top{background:#1d2330;color:#fff;padding:.8rem 1.2rem}.top h1{margin:0;font-size:1.3rem}.top p{margin:.2rem 0 0;color:#c9cfdb;font-size:.85rem}
.top a{color:#9cc9ff}main{max-width:1200px;margin:0 auto;padding:1rem}
h2{font-size:1.05rem;margin:0 0 .7rem}h2.section{margin:1.4rem 0 .6rem}h3{margin:0;font-size:1.05rem}
.card{background:var(--card);border-radius:10px;box-shadow:0 1px 3px rgba(16,24,40,.08);padding:1rem;margin-bottom:1rem}
.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(170px,1fr));gap:.8rem;margin-bottom:1rem}
.tile{background:var(--card);border-radius:10px;box-shadow:0 1px 3px rgba(16,24,40,.08);padding:.7rem .9rem;display:flex;flex-direction:column;border-top:4px solid #0072b2}
.tile.alert{border-top-color:#d7301f}.tile .k{color:var(--muted);font-size:.8rem;text-transform:uppercase;letter-spacing:.04em}
.tile .big{font-size:1.7rem;font-weight:650}.tile .sub{color:var(--muted);font-size:.8rem}
.row{display:grid;grid-template-columns:minmax(260px,1fr) 2fr;gap:1rem}.row>.card{margin:0}
.split{display:flex;gap:1.2rem;align-items:center;flex-wrap:wrap}.donut{flex:none}.donut-label{font-size:15px;font-weight:600;fill:var(--ink)}
.legend{list-style:none;margin:0;padding:0;flex:1;min-width:150px}.legend li{display:flex;gap:.5rem;align-items:center;padding:.2rem 0;border-bottom:1px solid var(--line)}
.swatch{width:.8rem;height:.8rem;border-radius:3px;flex:none}.legend .v{font-weight:600;flex:1}.legend .pct{color:var(--muted);width:3rem;text-align:right}
.gateway header{display:flex;align-items:center;gap:.7rem;flex-wrap:wrap}.facts{display:flex;flex-wrap:wrap;gap:.4rem 1.4rem;color:var(--muted);margin:.5rem 0 .8rem;font-size:.9rem}
.facts b{color:var(--ink)}
table{border-collapse:collapse;width:100%}th{font-size:.78rem;text-transform:uppercase;letter-spacing:.03em;color:var(--muted);text-align:left;font-weight:600}
th,td{padding:.45rem .5rem;border-bottom:1px solid var(--line);vertical-align:middle}td.id{font-weight:600;word-break:break-all}
td.cpu,td.mem{white-space:nowrap}.spark{vertical-align:middle}.spark-bg{fill:#f5f7fa}.spark-empty{font-size:9px;fill:var(--muted)}
.now{display:inline-block;width:3rem;text-align:right;font-variant-numeric:tabular-nums}
.chip{display:inline-block;padding:.05rem .55rem;border-radius:999px;background:var(--c);color:#fff;font-weight:600;font-size:.85rem;text-shadow:0 0 2px rgba(0,0,0,.35)}
.badge{display:inline-block;padding:.05rem .55rem;border-radius:999px;font-size:.8rem;font-weight:600;background:#eef0f3;color:#344054}
.badge.ok,.badge.wan-up{background:#dcfae6;color:#067647}.badge.degraded,.badge.wan-late{background:#fef0c7;color:#93370d}
.badge.failed,.badge.wan-down{background:var(--bad);color:var(--badink)}.badge.silent{background:#eaecf0;color:#475467}
tr.state-silent td{color:#98a2b3}tr.bad{background:var(--bad)}tr.bad td{color:#55160c}
.timeline{margin-top:.3rem}.lane{display:flex;align-items:center;gap:.6rem;height:1.6rem}
.lane-name{width:7.5rem;flex:none;font-size:.85rem;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.track{position:relative;flex:1;height:100%;border-bottom:1px dashed var(--line)}.tick{position:absolute;top:50%;transform:translate(calc(-50% - var(--n,0)*10px),-50%);line-height:0}
.tick.k-rolled_back,.tick.k-blacklisted{z-index:2}.axis{display:flex;justify-content:space-between;margin-left:8.1rem;color:var(--muted);font-size:.75rem}
.marks-legend{display:flex;flex-wrap:wrap;gap:.3rem 1rem;color:var(--muted);font-size:.8rem;margin:.6rem 0 0}.mark{vertical-align:-2px}
.ev{white-space:nowrap;font-weight:600}.muted{color:var(--muted)}
""" + SITE_VIEW_CSS + """@media (max-width:760px){
 main{padding:.6rem}.row{grid-template-columns:1fr}.tiles{grid-template-columns:repeat(2,1fr);gap:.5rem}.tile .big{font-size:1.35rem}
 table.robots thead,table.event-list thead{display:none}
 table.robots tr,table.event-list tr{display:grid;grid-template-columns:1fr 1fr;gap:.1rem .8rem;padding:.5rem 0;border-bottom:1px solid var(--line)}
 table.robots td,table.event-list td{border:0;padding:.15rem 0}
 td[data-label]::before{content:attr(data-label);display:block;font-size:.7rem;text-transform:uppercase;color:var(--muted)}
 .donut{width:120px;height:120px}td.id{grid-column:1/-1;font-size:1.05rem}td.detail{grid-column:1/-1}.lane-name{width:5.5rem}.axis{margin-left:6.1rem}
}
"""
