"""The site view (issue 16): per site, who is updating, who waits and why, who deferred.

Each gateway POSTs its orchestrator's snapshot to `POST /sites/orchestration`
(its gateway token; docs/formats.md, "Site orchestration snapshot"). `receive`
keeps the latest per site in the store, read strictly by
otad.orchestration.snapshot.parse_snapshot first (a gateway speaks for its own
site only). `site_views` makes the document /status.json and the rollout API
carry (all sites in one store query), `render_site_views` the HTML section
/status and the rollout pages show. A view is *stale* once no snapshot arrived
for STALE_AFTER_S: the gateway sends one at least every minute while it reaches
the dashboard, so silence means the site (or its WAN) is away, and the view is
shown as of its last report. Everything from gateways is escaped.
"""
from __future__ import annotations

import json
import logging
import time
from html import escape
from typing import Iterable

from otad.dashboard.rollout_store import RolloutStore
from otad.orchestration.snapshot import parse_snapshot, render_snapshot

log = logging.getLogger("otad.dashboard")
SITE_VIEW_PATH = "/sites/orchestration"
STALE_AFTER_S = 300


def receive(store: RolloutStore, gateway: str, body: bytes) -> None:
    """Keep `gateway`'s snapshot in `body`; SnapshotError (400, 403, 413) if it is refused."""
    snapshot = parse_snapshot(body, gateway)
    store.put_site_view(gateway, snapshot["at"], render_snapshot(snapshot).decode("ascii"))


def site_views(rows: Iterable[dict], now: float, sites: set[str] | None = None) -> list[dict]:
    """The stored snapshots (`sites`: only these) as the status document carries them: each
    snapshot with `received` (the dashboard's clock), `age_s` and `stale`."""
    views = []
    for row in rows:
        if sites is not None and row["gateway_id"] not in sites:
            continue
        try:
            snapshot = json.loads(row["body"])
        except ValueError:  # only a row damaged by hand: the rest of the page still shows
            log.error("site view of %s in the store is not JSON; skipped", row["gateway_id"])
            continue
        age = round(now - row["received"], 1)
        views.append({**snapshot, "site": row["gateway_id"], "received": row["received"], "age_s": age,
                      "stale": age > STALE_AFTER_S})
    return views


# -- the HTML section -----------------------------------------------------------------------


def _clock(epoch: float) -> str:
    return time.strftime("%H:%M", time.gmtime(epoch))


def _for(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _budget(view: dict) -> str:
    budget = view["budget"]
    if budget["slots"] is None or budget["source"] == "none":
        return f'<span>leases in use <b class="in-use">{budget["in_use"]}</b> (no limit)</span>'
    source = budget["source"] + (f' {budget["limit"]}' if budget["source"] == "SITE_MAX_CONCURRENT" else
                                 f', limit {budget["limit"]}')
    full = " bad" if budget["in_use"] >= budget["slots"] else ""
    return (f'<span>leases in use <b class="in-use{full}">{budget["in_use"]}/{budget["slots"]}</b>'
            f' <span class="source">({escape(source)})</span></span>')


def _window(view: dict) -> str:
    window = view["window"]
    spec = escape(window["spec"]) if window["spec"] else "always open"
    state = "open" if window["open"] else "closed"
    reason = f': {escape(window["reason"])}' if window["reason"] else ""
    return (f'<span class="window window-{state}">window <b>{state}</b>{reason} '
            f'<span class="muted">({spec}, {escape(view["timezone"])})</span></span>')


def _rows(entries: list[dict], cells, empty: str, columns: int) -> str:
    return "".join(cells(e) for e in entries) or f'<tr><td colspan="{columns}" class="muted">{escape(empty)}</td></tr>'


def _site_card(view: dict) -> str:
    at = view["at"]
    as_of = f'as of {_clock(view["received"])} UTC'
    stale = (f' <span class="badge failed stale">stale: {escape(as_of)}, site unreachable</span>' if view["stale"]
             else f' <span class="muted as-of">{escape(as_of)}</span>')
    updating = _rows(view["updating"], lambda e: (
        f'<tr class="updating" data-robot="{escape(e["robot"])}"><td class="id">{escape(e["robot"])}</td>'
        f'<td class="version">{escape(e["version"] or "-")}</td><td>lease {e["lease"]}</td>'
        f'<td class="since">since {_clock(e["since"])} UTC ({_for(at - e["since"])})</td></tr>'), "no robot is updating", 4)
    waiting = _rows(view["waiting"], lambda e: (
        f'<tr class="waiting" data-robot="{escape(e["robot"])}"><td class="id">{escape(e["robot"])}</td>'
        f'<td class="version">{escape(e["version"] or "-")}</td><td class="ahead">{e["ahead"]} ahead</td>'
        f'<td class="reason">{escape(e["reason"])}</td></tr>'), "no robot waits for a lease", 4)
    deferred = _rows(view["deferred"], lambda e: (
        f'<tr class="deferred{" bad" if e["too_long"] else ""}" data-robot="{escape(e["robot"])}">'
        f'<td class="id">{escape(e["robot"])}</td><td class="since">since {_clock(e["since"])} UTC ({_for(at - e["since"])})'
        f'{" <b>deferred too long</b>" if e["too_long"] else ""}</td><td class="reason" colspan="2">{escape(e["reason"])}</td></tr>'),
        "no robot deferred", 4)
    return (f'<article class="card site-view{" is-stale" if view["stale"] else ""}" data-site="{escape(view["site"])}">'
            f'<header><h3>{escape(view["site"])}</h3>{stale}</header>'
            f'<p class="facts">{_budget(view)}{_window(view)}'
            f'<span>expected install {_for(view["install_estimate_s"])}</span></p>'
            '<table class="site-orch"><tbody>'
            f'<tr class="head"><th colspan="4">updating ({len(view["updating"])})</th></tr>{updating}'
            f'<tr class="head"><th colspan="4">waiting ({len(view["waiting"])})</th></tr>{waiting}'
            f'<tr class="head"><th colspan="4">deferred ({len(view["deferred"])})</th></tr>{deferred}'
            "</tbody></table></article>")


def render_site_views(views: list[dict]) -> str:
    """The "Site orchestration" section, or "" when no site has reported one."""
    if not views:
        return ""
    return ('<section class="site-orchestration"><h2 class="section">Site orchestration</h2>'
            + "".join(_site_card(v) for v in views) + "</section>")


CSS = """
.site-view header{display:flex;align-items:center;gap:.7rem;flex-wrap:wrap}.site-view.is-stale{opacity:.8}
table.site-orch tr.head th{padding-top:.8rem}tr.deferred.bad{background:var(--bad)}b.bad{color:var(--badink)}
.window-closed b{color:#93370d}.source{color:var(--muted)}
"""
