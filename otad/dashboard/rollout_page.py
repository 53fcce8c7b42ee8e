"""GET /rollouts and /rollouts/<id>: the operator console, drawn from the rollout status document.

The page shows exactly what `GET /api/rollouts/<id>` carries (rollout_status.py):
per phase the counts fleet-wide and per site with a progress bar, the halts
with reason, sites and time, and the revisions. Reading needs no token, like
/status. The buttons (pause, resume, approve, abort) POST to the admin API with
the operator token the operator types in; it is kept in the tab's
sessionStorage only, never in a cookie, and there is no default. Everything
from plans, gateways and robots is escaped where it meets the markup.
"""
from __future__ import annotations

import json
import time
from html import escape

from otad.dashboard.site_view import render_site_views
from otad.dashboard.status import CSS as STATUS_CSS

REFRESH_S = 10
COUNTS = ("targeted", "waiting", "installing", "committed", "failed")


def _when(epoch: float | None) -> str:
    return "-" if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _bar(row: dict) -> str:
    """Committed and failed shares of the targeted robots, and installing, as one bar."""
    total = max(row["targeted"], 1)
    parts = []
    for key in ("committed", "failed", "installing"):
        share = 100.0 * row[key] / total
        if share:
            parts.append(f'<span class="seg {key}" style="width:{share:.1f}%" title="{key} {row[key]}"></span>')
    label = f'{row["committed"]}/{row["targeted"]} committed'
    return f'<div class="bar" role="img" aria-label="{escape(label)}">{"".join(parts)}</div>'


def _counts(row: dict) -> str:
    cells = "".join(f'<td class="n {key}" data-label="{key}">{row[key]}</td>' for key in COUNTS)
    halted = '<span class="badge failed">halted</span>' if row["halted"] else ""
    return f'{cells}<td class="prog" data-label="progress">{_bar(row)}</td><td class="h">{halted}</td>'


def _phase_rows(doc: dict) -> str:
    rows = []
    for phase in doc["phases"]:
        who = ", ".join(phase["robots"])
        what = escape(" + ".join(x for x in (who, f'{phase["percent"]:g}%' if phase["percent"] else "") if x))
        gate = " · approve" if phase["advance"] == "approve" else ""
        rows.append(f'<tr class="phase" data-phase="{phase["index"]}"><td class="id">phase {phase["index"]}'
                    f'<div class="muted">{what}{escape(gate)} · soak {phase["min_soak_s"]}s</div></td>'
                    f'<td class="site">all sites</td>{_counts(phase)}</tr>')
        for site, row in phase["sites"].items():
            rows.append(f'<tr class="site-row" data-phase="{phase["index"]}" data-site="{escape(site)}"><td></td>'
                        f'<td class="site">{escape(site)}</td>{_counts(row)}</tr>')
    return "".join(rows)


def _halt_rows(doc: dict) -> str:
    rows = [f'<tr class="halt"><td class="when">{escape(_when(h["at"]))}</td><td class="scope">{escape(h["scope"])}</td>'
            f'<td class="n">{h["phase"]}</td><td class="sites">{escape(", ".join(h["sites"]) or "-")}</td>'
            f'<td class="reason">{escape(h["reason"])}</td></tr>' for h in doc["halts"]]
    return "".join(rows) or '<tr><td colspan="5" class="muted">no halt</td></tr>'


def _revision_rows(doc: dict) -> str:
    return "".join(f'<tr><td class="n">{r["revision"]}</td><td><span class="badge st-{escape(r["state"])}">{escape(r["state"])}'
                   f'</span></td><td class="when">{escape(_when(r["issued"]))}</td><td>{escape(r["actor"])}</td>'
                   f'<td class="reason">{escape(r["reason"])}</td></tr>' for r in reversed(doc.get("revisions", [])))


def _page(title: str, body: str, script: str = "", refresh: bool = False) -> bytes:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_S}">' if refresh else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">{meta}
<title>{escape(title)}</title><style>{STATUS_CSS}{CSS}</style></head><body>
<header class="top"><h1>{escape(title)}</h1><p><a href="/status">fleet status</a> · <a href="/rollouts">rollouts</a></p></header>
<main>{body}</main>{script}</body></html>
""".encode("utf-8")


def render_rollout(doc: dict) -> bytes:
    state = doc["state"]
    actions = [a for a, allowed in (("pause", state == "active"), ("resume", state == "paused"),
                                    ("approve", state != "aborted" and doc["approved_phase"] < len(doc["phases"]) - 1),
                                    ("abort", state != "aborted")) if allowed]
    buttons = "".join(f'<button type="button" class="act {a}" data-action="{a}">{a}</button>' for a in actions)
    reason = f'<p class="reason">{escape(doc["reason"])}</p>' if doc["reason"] else ""
    body = f"""
<section class="card summary" data-rollout="{escape(doc["rollout_id"])}">
<h2><span class="rid">{escape(doc["rollout_id"])}</span> → <span class="version">{escape(doc["version"])}</span>
<span class="badge state st-{escape(state)}">{escape(state)}</span></h2>{reason}
<p class="meta muted">revision <b class="revision">{doc["revision"]}</b> · issued {escape(_when(doc["issued"]))} by {escape(doc["issued_by"])}
 · from {escape(", ".join(doc["from"]) or "any version")} · on halt {escape(doc["on_halt"])} · offline {escape(doc["offline_policy"])}
 · approved up to phase {doc["approved_phase"]} · expires {escape(doc["expires"])}</p>
<form class="console" onsubmit="return false"><label>operator token <input type="password" id="token" autocomplete="off"
 placeholder="from OPERATOR_TOKENS_FILE"></label> <input type="text" id="reason" maxlength="200" placeholder="reason (optional)">
 {buttons}<output id="result" class="muted"></output></form></section>
<section class="card"><h2>Phases</h2><table class="phases"><thead><tr><th>phase</th><th>site</th>
{"".join(f"<th>{c}</th>" for c in COUNTS)}<th>progress</th><th></th></tr></thead><tbody>{_phase_rows(doc)}</tbody></table></section>
<section class="card"><h2>Halts</h2><table class="halts"><thead><tr><th>when</th><th>scope</th><th>phase</th><th>sites</th>
<th>reason</th></tr></thead><tbody>{_halt_rows(doc)}</tbody></table></section>
{render_site_views(doc.get("site_orchestration", []))}
<section class="card"><h2>Revisions</h2><table class="revisions"><thead><tr><th>rev</th><th>state</th><th>issued</th><th>by</th>
<th>reason</th></tr></thead><tbody>{_revision_rows(doc)}</tbody></table></section>"""
    return _page(f'rollout {doc["rollout_id"]}', body, SCRIPT.replace("ROLLOUT_ID", json.dumps(doc["rollout_id"])))


def render_rollouts(rollouts: list[dict]) -> bytes:
    rows = []
    for doc in rollouts:
        fleet = {k: sum(p[k] for p in doc["phases"]) for k in COUNTS}
        fleet["halted"] = any(p["halted"] for p in doc["phases"])
        link = f'/rollouts/{escape(doc["rollout_id"])}'
        rows.append(f'<tr class="rollout"><td class="id"><a href="{link}">{escape(doc["rollout_id"])}</a></td>'
                    f'<td class="version">{escape(doc["version"])}</td><td><span class="badge st-{escape(doc["state"])}">'
                    f'{escape(doc["state"])}</span></td><td class="n">{doc["revision"]}</td>{_counts(fleet)}</tr>')
    table = "".join(rows) or '<tr><td colspan="10" class="muted">no rollout yet (otad-release rollout create)</td></tr>'
    body = f"""<section class="card"><h2>Rollouts</h2><table class="rollouts"><thead><tr><th>rollout</th><th>version</th>
<th>state</th><th>rev</th>{"".join(f"<th>{c}</th>" for c in COUNTS)}<th>progress</th><th></th></tr></thead>
<tbody>{table}</tbody></table></section>"""
    return _page("otad rollouts", body, refresh=True)


# The buttons: the admin API with the typed token; the answer (or the one-line error) shows, then the page reloads.
SCRIPT = """<script>
(function(){
  var id = ROLLOUT_ID, token = document.getElementById('token'), out = document.getElementById('result');
  token.value = sessionStorage.getItem('otad-operator-token') || '';
  document.querySelectorAll('button.act').forEach(function(button){
    button.addEventListener('click', function(){
      if (!token.value) { out.textContent = 'enter your operator token first'; return; }
      sessionStorage.setItem('otad-operator-token', token.value);
      var reason = document.getElementById('reason').value, body = reason ? {reason: reason} : {};
      out.textContent = button.dataset.action + '...';
      fetch('/api/rollouts/' + encodeURIComponent(id) + '/' + button.dataset.action,
            {method: 'POST', headers: {'Authorization': 'Bearer ' + token.value, 'Content-Type': 'application/json'},
             body: JSON.stringify(body)})
        .then(function(r){ return r.json().then(function(j){ return [r.status, j]; }); })
        .then(function(a){
          if (a[0] === 200) { out.textContent = 'revision ' + a[1].revision + ': ' + a[1].state; location.reload(); }
          else { out.textContent = 'refused (' + a[0] + '): ' + a[1].error; out.className = 'error'; }
        })
        .catch(function(e){ out.textContent = 'failed: ' + e; out.className = 'error'; });
    });
  });
})();
</script>"""

CSS = """
.bar{display:flex;height:.8rem;min-width:8rem;background:#eef0f3;border-radius:4px;overflow:hidden}
.seg.committed{background:#12b76a}.seg.failed{background:#d92d20}.seg.installing{background:#fdb022}
td.n{text-align:right;font-variant-numeric:tabular-nums}tr.phase td{border-top:2px solid var(--line);font-weight:600}
tr.site-row td{color:#475467}.console{display:flex;flex-wrap:wrap;gap:.5rem;align-items:center;margin-top:.6rem}
.console input{padding:.3rem .4rem;border:1px solid var(--line);border-radius:6px}
button.act{padding:.35rem .9rem;border:0;border-radius:6px;font-weight:600;cursor:pointer;background:#175cd3;color:#fff}
button.abort{background:#d92d20}button.pause{background:#dc6803}.error{color:var(--badink);font-weight:600}
.badge.st-active{background:#dcfae6;color:#067647}.badge.st-paused{background:#fef0c7;color:#93370d}
.badge.st-aborted{background:var(--bad);color:var(--badink)}td.reason{max-width:28rem}
"""
