"""The site view (issue 16): per site, who is updating, who waits and why, who deferred.

A real otad-dashboard (tests/test_rollout_dashboard.py's open_desk: gateways gw and
gw-b, a rollout key) takes gateways' orchestration snapshots on
POST /sites/orchestration and shows them on /status, /status.json and the rollout
pages. Snapshots come from a real otad-gateway whose robots take install leases by
POST /lease (Wire 5), or, for the dashboard's own checks, are POSTed by the test as
a gateway sends them (the same endpoint, real HTTP). The hostile snapshots are
tests/corpus/site-view/ (tests/corpus/README.md).
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import requests

from fleet import GATEWAY_TOKEN, metric
from harness import wait_until
from otad.dashboard.site_view import STALE_AFTER_S, render_site_views, site_views
from test_orchestration_gateway import LeaseSite
from test_rollout_dashboard import API, SITE_B_TOKEN, api, built, desk, forward, open_desk, plan_fields  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow  # a daemon test, like the other rollout daemons' tests (test_rollout_dashboard.py)

CORPUS = Path(__file__).parent / "corpus"
CASES = json.loads((CORPUS / "site-view-cases.json").read_text())
VIEW = "/sites/orchestration"
VALID_SNAPSHOT = {
    "site": "gw", "at": 1764757380, "timezone": "Europe/Berlin",
    "budget": {"limit": "1", "source": "SITE_MAX_CONCURRENT", "slots": 1, "in_use": 1},
    "window": {"spec": "", "open": True, "reason": "always open"},
    "updating": [{"robot": "r1", "lease": 3, "version": "2.0.0", "since": 1764757300, "expires_at": 1764757600}],
    "waiting": [{"robot": "r2", "ahead": 0, "version": "2.0.0", "since": 1764757310,
                 "reason": "site budget full: 1 of 1 leases in use (SITE_MAX_CONCURRENT 1)"}],
    "deferred": [{"robot": "r3", "since": 1764757000, "reason": "deferred by READY_CMD: retry-after=600", "too_long": False}],
    "install_estimate_s": 42.0,
}


def snapshot(**changes) -> dict:
    doc = copy.deepcopy(VALID_SNAPSHOT)
    doc["at"] = time.time()
    doc.update(changes)
    return doc


def post_view(desk, body: bytes | dict, token: str = GATEWAY_TOKEN, **headers) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(desk.dashboard.url + VIEW, data=data, timeout=10,
                         headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json", **headers})


def status_views(desk) -> dict[str, dict]:
    doc = requests.get(f"{desk.dashboard.url}/status.json", timeout=10).json()
    return {v["site"]: v for v in doc["site_orchestration"]}


def held_views(desk) -> dict[str, dict]:
    """The views as stored (the age, which grows, left out)."""
    return {site: {k: v for k, v in view.items() if k not in ("age_s", "stale")} for site, view in status_views(desk).items()}


@pytest.fixture(scope="module")
def view_desk(tmp_path_factory, role_keys, built):
    """One dashboard for the checks that change nothing but the site views: gw's view posted first."""
    site = open_desk(tmp_path_factory.mktemp("site-view"), role_keys, built)
    assert post_view(site, snapshot()).status_code == 200
    yield site
    site.stop_all()


# -- the dashboard: endpoint, store, pages ----------------------------------------------------


def test_status_shows_per_site_who_updates_who_waits_and_why_and_who_deferred(view_desk):
    desk = view_desk
    hostile = snapshot(waiting=[{**VALID_SNAPSHOT["waiting"][0], "reason": "<script>alert(1)</script> & co"}],
                       deferred=[{**VALID_SNAPSHOT["deferred"][0], "too_long": True}],
                       window={"spec": "Mon-Fri 22:00-05:00", "open": False, "reason": "outside window until 22:00"})
    reply = post_view(desk, hostile)
    assert reply.status_code == 200 and reply.json() == {"ok": True}
    view = status_views(desk)["gw"]
    assert [e["robot"] for e in view["updating"]] == ["r1"] and view["waiting"][0]["ahead"] == 0
    assert view["budget"] == {"limit": "1", "source": "SITE_MAX_CONCURRENT", "slots": 1, "in_use": 1}
    assert view["deferred"][0]["too_long"] and not view["stale"] and view["age_s"] < 60
    page = requests.get(f"{desk.dashboard.url}/status", timeout=10)
    assert page.status_code == 200
    html = page.text
    assert "Site orchestration" in html and 'data-site="gw"' in html
    assert 'class="in-use bad">1/1</b>' in html and "SITE_MAX_CONCURRENT 1" in html
    assert 'data-robot="r1"' in html and "2.0.0" in html and "lease 3" in html
    assert "0 ahead" in html and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in html and "<script>alert" not in html
    assert "deferred by READY_CMD: retry-after=600" in html and "deferred too long" in html
    assert "window <b>closed</b>: outside window until 22:00" in html and "Mon-Fri 22:00-05:00, Europe/Berlin" in html
    assert "as of " + time.strftime("%H:", time.gmtime()) in html and "site unreachable" not in html
    assert post_view(desk, snapshot()).status_code == 200  # the latest replaces the one before
    assert status_views(desk)["gw"]["waiting"][0]["reason"] == VALID_SNAPSHOT["waiting"][0]["reason"]


def test_a_view_not_renewed_for_five_minutes_is_shown_stale_as_of_its_last_report(view_desk):
    """Staleness is the dashboard's clock against the row's `received`; waiting five minutes is no
    test, so the real site_views/render_site_views run on the real store rows at now + 301 s."""
    rows = _store_rows(view_desk)
    received = rows[0]["received"]
    fresh = site_views(rows, received + STALE_AFTER_S)
    stale = site_views(rows, received + STALE_AFTER_S + 1)
    assert not fresh[0]["stale"] and stale[0]["stale"]
    html = render_site_views(stale)
    assert f"stale: as of {time.strftime('%H:%M', time.gmtime(received))} UTC, site unreachable" in html
    assert render_site_views([]) == ""


def _store_rows(desk) -> list[dict]:
    from otad.dashboard.store import SqliteTelemetryStore

    store = SqliteTelemetryStore(desk.db)
    try:
        return store.site_views()
    finally:
        store.close()


def test_the_rollout_page_shows_the_site_views_of_the_rollouts_sites_only(desk):
    assert api(desk, "POST", API, json=plan_fields()).status_code == 201
    forward(desk, "gw", GATEWAY_TOKEN, [{"id": 1, "received": time.time(), "record": metric("r1", 1)}])  # r1 on 1.0.0
    assert post_view(desk, snapshot()).status_code == 200
    assert post_view(desk, snapshot(site="gw-b", updating=[], waiting=[], deferred=[]), SITE_B_TOKEN).status_code == 200
    assert set(status_views(desk)) == {"gw", "gw-b"}
    status = api(desk, "GET", f"{API}/app-2").json()
    assert [v["site"] for v in status["site_orchestration"]] == ["gw"]
    page = requests.get(f"{desk.dashboard.url}/rollouts/app-2", timeout=10).text
    assert "Site orchestration" in page and 'data-site="gw"' in page and 'data-site="gw-b"' not in page
    assert "site budget full: 1 of 1 leases in use (SITE_MAX_CONCURRENT 1)" in page


def test_a_gateway_speaks_for_its_own_site_only_and_needs_its_token(view_desk):
    desk = view_desk
    before = held_views(desk)
    other = post_view(desk, snapshot(), SITE_B_TOKEN)  # gw-b's token, gw's site
    assert other.status_code == 403 and "token is for gateway gw-b" in other.json()["error"]
    assert post_view(desk, snapshot(), "wrong-token-0123456789").status_code == 401
    assert requests.post(desk.dashboard.url + VIEW, json=snapshot(), timeout=10).status_code == 401
    assert requests.get(desk.dashboard.url + VIEW, timeout=10).status_code == 405
    assert held_views(desk) == before


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_hostile_snapshots_are_refused_with_a_one_line_error_and_change_nothing(view_desk, case):
    desk = view_desk
    before = held_views(desk)
    reply = post_view(desk, (CORPUS / case["file"]).read_bytes(), **case["headers"])
    assert reply.status_code == case["status"], reply.text[:300]
    assert reply.headers["Content-Type"] == "application/json"
    error = reply.json()["error"]
    assert case["expect"] in error and "\n" not in error and len(error) < 400, error
    assert held_views(desk) == before and "gw" in before
    assert desk.dashboard.running() and "Traceback" not in desk.dashboard.log()


def test_every_site_view_case_has_a_file_and_every_file_a_case():
    assert {c["file"] for c in CASES} == {f"site-view/{p.name}" for p in (CORPUS / "site-view").iterdir()}


# -- end to end: a real gateway's orchestrator, its sender, the dashboard ----------------------


def lease_site(desk, tmp_path: Path) -> LeaseSite:
    """Robots r1 and r2 with their tokens, asking a gateway of `desk` for leases (its own token file too)."""
    (tmp_path / "robots").mkdir()
    return LeaseSite(desk, tmp_path / "robots", ["r1", "r2"])


def view_of(desk, site: str = "gw", **expect):
    """Wait until the dashboard shows `site`'s view with these robots per list; the view."""
    def shown():
        view = status_views(desk).get(site)
        if view is None:
            return None
        lists = {name: [e["robot"] for e in view[name]] for name in expect}
        return view if lists == expect else None
    return wait_until(shown, 30, f"the dashboard to show {site} with {expect}")


def test_status_shows_whom_a_real_gateway_lets_update_and_who_waits_with_the_gateways_reason(desk, tmp_path):
    """SITE_MAX_CONCURRENT=1, two robots asking POST /lease: /status shows r1 updating and r2
    waiting with the reason the gateway answered r2; a release moves the view on."""
    leases = lease_site(desk, tmp_path)
    gw = leases.start(SITE_MAX_CONCURRENT=1, TOKEN_FILE=leases.tokens["gateway_own"])
    gw.wait_for_log(r"verified app 2\.0\.0")
    first, second = leases.request("r1"), leases.request("r2")
    assert first["state"] == "granted" and second["state"] == "waiting"
    view = view_of(desk, updating=["r1"], waiting=["r2"], deferred=[])
    assert view["budget"]["in_use"] == 1 and view["budget"]["slots"] == 1
    assert view["budget"]["source"] == "SITE_MAX_CONCURRENT" and view["window"]["open"]
    assert view["updating"][0]["lease"] == first["lease"] and view["updating"][0]["version"] == "2.0.0"
    why = view["waiting"][0]["reason"]  # the gateway's reason, as it told r2 (which also names r2 and its place)
    assert why == "site budget full: 1 of 1 leases in use (SITE_MAX_CONCURRENT 1)" and why in second["reason"]
    assert view["waiting"][0]["ahead"] == 0
    html = requests.get(f"{desk.dashboard.url}/status", timeout=10).text
    assert 'data-robot="r1"' in html and f"lease {first['lease']}" in html
    assert 'data-robot="r2"' in html and why in html and "0 ahead" in html
    leases.release("r1", first["lease"])
    assert leases.request("r2")["state"] == "granted"
    view_of(desk, updating=["r2"], waiting=[], deferred=[])
    assert "site view" not in gw.log()  # nothing went wrong, so nothing was logged


def test_the_gateway_sends_nothing_while_the_dashboard_is_away_and_logs_a_refusal_once(desk, tmp_path):
    """The dashboard down: leases go on at the site, the sender stays quiet; back up, the view
    follows. A token the dashboard does not know: one log line over many polls, and the
    release sync goes on (the gateway still verifies and serves)."""
    leases = lease_site(desk, tmp_path)
    gw = leases.start(SITE_MAX_CONCURRENT=1, TOKEN_FILE=leases.tokens["gateway_own"])
    gw.wait_for_log(r"verified app 2\.0\.0")
    view_of(desk, updating=[], waiting=[], deferred=[])
    desk.dashboard.kill9()
    gw.wait_for_log(r"sync failed")
    assert leases.request("r1")["state"] == "granted" and leases.request("r2")["state"] == "waiting"
    desk.dashboard.start()
    view_of(desk, updating=["r1"], waiting=["r2"], deferred=[])
    assert "site view" not in gw.log()
    # Now with a token the dashboard does not take: refused, logged once, the sync goes on.
    token = leases.tokens["gateway_own"]
    good = token.read_text()
    token.write_text("not-a-known-token-0123456789\n")
    gw.signal(1)  # SIGHUP: token files are read again
    gw.wait_for_log(r"site view: the dashboard refused it \(HTTP 401")
    leases.release("r1", leases.request("r1")["lease"])  # changes, sent (and refused) again
    assert leases.request("r2")["state"] == "granted"
    desk.release("3.0.0", size=1024)
    gw.wait_for_log(r"verified app 3\.0\.0")
    token.write_text(good)
    gw.signal(1)
    view_of(desk, updating=["r2"], waiting=[], deferred=[])
    log = gw.log()
    assert log.count("site view: the dashboard refused it") == 1 and log.count("site view: sent to the dashboard") == 1
    assert gw.running()
