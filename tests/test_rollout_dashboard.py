"""Staged rollouts at the dashboard (issue 15): the real otad-dashboard, real HTTP, the real CLI.

Plans are created and steered with `otad-release rollout ...` against the
admin API (operator tokens); gateways' wires are spoken the way the gateway
speaks them: GET /rollouts.json (Wire 1), update events with rollout_id and
phase in POST /metrics batches as the forwarder sends them (Wire 3), and
POST /rollouts/site-report (Wire 4). Served plans are verified with the real
rollout public key (otad.rollout.signed.verify_plan), as gateways will.
The hostile admin bodies are tests/corpus/admin/ (tests/corpus/README.md).
"""
from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import assert_one_line_error, otad_release
from fleet import GATEWAY_TOKEN, Site, metric, write_tokens
from harness import Daemon, wait_until
from otad.rollout.cohort import phase_of
from otad.rollout.signed import UntrustedPlan, verify_plan
from otad.trust.keys import load_public_key

# The rollout daemons' tests run once, in make check's first pass (current PyPI), and not again
# on the bookworm pins: they exercise otad's rollout logic through the same HTTP and crypto calls
# that the other daemon tests, which do run there, already cover (CI time).
pytestmark = pytest.mark.slow

CORPUS = Path(__file__).parent / "corpus"
ADMIN_CASES = json.loads((CORPUS / "admin-cases.json").read_text())
OPERATOR_TOKEN = "operator-token-0123456789"
SITE_B_TOKEN = "gateway-b-token-0123456789"
API = "/api/rollouts"


def plan_fields(rollout_id: str = "app-2", version: str = "2.0.0", **changes) -> dict:
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 30 * 86400))
    return {"rollout_id": rollout_id, "expires": expires, "version": version, "from": ["1.0.0"],
            "install_timeout_s": 3600, "on_halt": "rollback",
            "phases": [{"robots": ["r1", "r2"], "advance": "approve", "halt": {"fleet": {"max_failures": 1}}},
                       {"percent": 50, "halt": {"fleet": {"max_failure_rate": 0.5, "min_attempts": 4}}},
                       {"percent": 100}], **changes}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Site:
    """Releases 1.0.0 and 2.0.0, built once for the module with their own release key."""
    root = tmp_path_factory.mktemp("rollout-releases")
    assert otad_release("keygen", "--output-prefix", str(root / "release")).returncode == 0
    site = Site(root, root / "release.key", root / "release.pub")
    site.outs = [site.build(version, size=1024) for version in ("1.0.0", "2.0.0")]
    return site


def open_desk(root: Path, role_keys, built: Site, check_interval: int = 1) -> Site:
    """A dashboard holding the rollout key, with 1.0.0 and 2.0.0 published, two gateways and an operator."""
    site = Site(root, built.key, built.pub)
    site.tokens = write_tokens(root, ["r1"])
    with open(site.tokens["dashboard"], "a") as stream:
        stream.write(f"gw-b {SITE_B_TOKEN}\n")
    operators = root / "operator-tokens"
    operators.write_text(f"# operator_id token\nalice {OPERATOR_TOKEN}\n")
    operators.chmod(0o600)
    site.operator_file = root / "alice.token"
    site.operator_file.write_text(OPERATOR_TOKEN + "\n")
    site.operator_file.chmod(0o600)
    for out in built.outs:
        site.publish(out)
    site.start_dashboard(env={"OTAD_ROLLOUT_KEY_PASSWORD": "test-password"}, TOKENS_FILE=site.tokens["dashboard"],
                         OPERATOR_TOKENS_FILE=operators, ROLLOUT_KEY=role_keys["folder"] / "rollout.key",
                         ROLLOUT_CHECK_INTERVAL=check_interval)
    site.db = root / "dashboard-state" / "telemetry.db"
    return site


@pytest.fixture
def desk(tmp_path, role_keys, built):
    site = open_desk(tmp_path, role_keys, built)
    yield site
    site.stop_all()


@pytest.fixture(scope="module")
def shared_desk(tmp_path_factory, role_keys, built):
    """One dashboard for the hostile bodies, which must change nothing: rollout app-2 at revision 1."""
    site = open_desk(tmp_path_factory.mktemp("rollout-corpus"), role_keys, built)
    assert api(site, "POST", API, json=plan_fields()).status_code == 201
    yield site
    site.stop_all()


def rollout(site: Site, *args: str):
    return otad_release("rollout", *args, "--dashboard", site.dashboard.url, "--token-file", str(site.operator_file))


def served(site: Site) -> dict[str, dict]:
    """Wire 1 as a gateway reads it: rollout_id -> {"plan": str, "bundle": dict}."""
    response = requests.get(f"{site.dashboard.url}/rollouts.json", timeout=10)
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    return {json.loads(item["plan"])["rollout_id"]: item for item in response.json()["plans"]}


def verified(item: dict, role_keys) -> object:
    return verify_plan(item["plan"].encode(), json.dumps(item["bundle"]).encode(), (role_keys["rollout"][1],), time.time())


def api(site: Site, method: str, path: str, token: str | None = OPERATOR_TOKEN, timeout: float = 10,
        **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, site.dashboard.url + path, headers=headers, timeout=timeout, **kwargs)


def forward(site: Site, gateway: str, token: str, rows: list[dict], buffer_id: str = "ab01") -> None:
    """POST /metrics as a gateway's forwarder sends its buffer: rows of {"id", "received", "record"}."""
    body = {"gateway_id": gateway, "buffer_id": buffer_id, "backlog": 0, "records": rows}
    response = requests.post(f"{site.dashboard.url}/metrics", json=body, timeout=10, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text


def update_event(robot: str, seq: int, name: str, rollout_id: str, phase: int, version: str = "2.0.0") -> dict:
    ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"robot_id": robot, "boot_id": "boot-1", "seq": seq, "ts": ts, "type": "event", "event": name,
            "version": version, "detail": "", "rollout_id": rollout_id, "phase": phase}


def write_plan(site: Site, doc: dict, name: str = "plan.json") -> str:
    path = site.root / name
    path.write_text(json.dumps(doc))
    return str(path)


# -- the operator's CLI ---------------------------------------------------------------------


def test_an_operator_runs_a_rollout_through_the_cli(desk, role_keys):
    assert served(desk) == {}
    created = rollout(desk, "create", write_plan(desk, plan_fields()))
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip() == "created rollout app-2 revision 1 (active)"
    first = verified(served(desk)["app-2"], role_keys)
    assert (first.plan.revision, first.plan.state, first.plan.approved_phase) == (1, "active", 0)

    steps = [("approve", (), "revision 2: active", ("active", 1)),
             ("pause", ("--reason", "weekend freeze"), "revision 3: paused", ("paused", 1)),
             ("resume", (), "revision 4: active", ("active", 1)),
             ("approve", ("--phase", "2"), "revision 5: active", ("active", 2)),
             ("abort", ("--reason", "bad battery readings"), "revision 6: aborted", ("aborted", 2))]
    for action, extra, answer, (state, approved) in steps:
        result = rollout(desk, action, "app-2", *extra)
        assert result.returncode == 0 and answer in result.stdout, (action, result.stdout, result.stderr)
        plan = verified(served(desk)["app-2"], role_keys).plan
        assert (plan.state, plan.approved_phase) == (state, approved), action
    assert plan.reason == "bad battery readings"

    status = rollout(desk, "status", "app-2", "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert (doc["revision"], doc["state"], [r["actor"] for r in doc["revisions"]][-1]) == (6, "aborted", "operator alice")
    assert [r["state"] for r in doc["revisions"]] == ["active", "active", "paused", "active", "active", "aborted"]
    assert len(doc["phases"]) == 3 and doc["phases"][0]["targeted"] >= 0
    text = rollout(desk, "status", "app-2")
    assert text.returncode == 0 and "app-2 revision 6 aborted -> 2.0.0" in text.stdout
    listed = rollout(desk, "status")
    assert listed.returncode == 0 and "app-2 revision 6 aborted" in listed.stdout

    # Aborted is final; an unknown rollout and a duplicate id are refused in one line.
    assert_one_line_error(rollout(desk, "resume", "app-2"), "HTTP 409", "aborted (final)")
    assert_one_line_error(rollout(desk, "pause", "nope"), "HTTP 404", "no rollout")
    assert_one_line_error(rollout(desk, "create", write_plan(desk, plan_fields())), "HTTP 409", "exists already")
    assert verified(served(desk)["app-2"], role_keys).plan.revision == 6


def test_approve_without_a_phase_opens_the_first_gate_not_approved_phase_plus_one(desk, role_keys):
    """The gate is where a phase says advance=approve: here phase 2 (phase 1 starts by itself). An
    approval without --phase must open it; approving phase 1 instead would leave the site waiting."""
    fields = plan_fields(rollout_id="gated", phases=[{"robots": ["r1"]}, {"percent": 50, "advance": "approve"},
                                                    {"percent": 100}])
    assert rollout(desk, "create", write_plan(desk, fields)).returncode == 0
    result = rollout(desk, "approve", "gated")
    assert result.returncode == 0, result.stderr
    assert verified(served(desk)["gated"], role_keys).plan.approved_phase == 2
    assert_one_line_error(rollout(desk, "approve", "gated"), "HTTP 409", "no phase of rollout gated waits for an approval")


def test_served_plans_verify_under_the_rollout_key_only(desk, role_keys):
    assert rollout(desk, "create", write_plan(desk, plan_fields())).returncode == 0
    item = served(desk)["app-2"]
    assert verified(item, role_keys).plan.version == "2.0.0"
    release_pub = load_public_key(desk.pub.read_bytes(), desk.pub.name)  # the key the releases here are signed with
    for keys in ((release_pub,), (role_keys["release"][1],)):
        with pytest.raises(UntrustedPlan):
            verify_plan(item["plan"].encode(), json.dumps(item["bundle"]).encode(), keys, time.time())


def test_create_refuses_a_version_that_is_not_published(desk):
    assert_one_line_error(rollout(desk, "create", write_plan(desk, plan_fields(version="9.9.9"))), "HTTP 409",
                          "version 9.9.9 cannot be rolled out", "releases/9.9.9/manifest.json is not in")
    # An earlier publish stays a release the dashboard holds whole, with its own manifest pair.
    back = plan_fields(rollout_id="back-to-1", version="1.0.0", **{"from": ["2.0.0"]})
    assert rollout(desk, "create", write_plan(desk, back)).returncode == 0
    assert set(served(desk)) == {"back-to-1"}


def test_create_refuses_a_version_whose_manifest_gateways_cannot_fetch(desk, built):
    """3.0.0's artifact, signature and checksum file copied into OTA_DIR by hand, without `otad-release
    publish`: no releases/3.0.0/ pair, so no gateway could fetch and verify it; a plan for it is refused."""
    out = built.build("3.0.0", size=1024)
    manifest = json.loads((out / "manifest.json").read_text())
    for name in (manifest["artifact"], manifest["bundle"], manifest["checksum"]):
        (desk.ota / name).write_bytes((out / name).read_bytes())
    assert_one_line_error(rollout(desk, "create", write_plan(desk, plan_fields(rollout_id="app-3", version="3.0.0"))),
                          "HTTP 409", "version 3.0.0 cannot be rolled out", "releases/3.0.0/manifest.json is not in",
                          "gateways cannot fetch it")
    assert served(desk) == {}
    desk.publish(out)  # published properly, it is accepted
    assert rollout(desk, "create", write_plan(desk, plan_fields(rollout_id="app-3", version="3.0.0"))).returncode == 0


def test_wrong_missing_and_gateway_tokens_are_refused(desk, tmp_path):
    for token in (None, "wrong-token-0123456789", GATEWAY_TOKEN):
        for method, path in (("GET", API), ("POST", API), ("GET", f"{API}/app-2"), ("POST", f"{API}/app-2/abort")):
            response = api(desk, method, path, token, json=plan_fields())
            assert response.status_code == 401, (token, method, path)
            assert response.headers["WWW-Authenticate"] == "Bearer" and "operator token" in response.json()["error"]
    wrong = tmp_path / "wrong.token"
    wrong.write_text(GATEWAY_TOKEN + "\n")
    wrong.chmod(0o600)
    result = otad_release("rollout", "create", write_plan(desk, plan_fields()), "--dashboard", desk.dashboard.url,
                          "--token-file", str(wrong))
    assert_one_line_error(result, "HTTP 401", "missing or wrong operator token")
    public = tmp_path / "public.token"
    public.write_text(OPERATOR_TOKEN + "\n")
    public.chmod(0o644)
    assert_one_line_error(otad_release("rollout", "status", "--dashboard", desk.dashboard.url, "--token-file", str(public)),
                          "readable or writable by every user")
    # The operator token is not a gateway token either: Wire 4 wants a gateway's.
    report = {"site": "gw", "rollout_id": "app-2", "revision": 1, "phases": [], "halted": None}
    assert api(desk, "POST", "/rollouts/site-report", OPERATOR_TOKEN, json=report).status_code == 401
    assert served(desk) == {} and OPERATOR_TOKEN not in desk.dashboard.log()


def test_a_world_readable_rollout_key_is_refused(tmp_path, role_keys):
    site = Site(tmp_path, tmp_path / "unused.key", tmp_path / "unused.pub")
    exposed = tmp_path / "rollout.key"
    exposed.write_bytes((role_keys["folder"] / "rollout.key").read_bytes())
    exposed.chmod(0o644)
    conf = tmp_path / "check.conf"
    conf.write_text(f"LISTEN=127.0.0.1:0\nOTA_DIR={site.ota}\nSTATE_DIR={tmp_path / 'state'}\nROLLOUT_KEY={exposed}\n")

    daemon = Daemon("otad-dashboard", conf, tmp_path / "check.log").start(wait_listening=False)
    daemon.proc.wait(20)
    assert daemon.proc.returncode != 0
    assert "rollout key is readable or writable by every user" in daemon.log()


@pytest.mark.parametrize("case", ADMIN_CASES, ids=[c["id"] for c in ADMIN_CASES])
def test_hostile_admin_bodies_are_refused_and_change_nothing(shared_desk, case):
    desk = shared_desk
    before = served(desk)
    path = {"create": API, "pause": f"{API}/app-2/pause", "approve": f"{API}/app-2/approve",
            "site-report": "/rollouts/site-report"}[case["route"]]
    token = GATEWAY_TOKEN if case["route"] == "site-report" else OPERATOR_TOKEN
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json", **case["headers"]}
    body = (CORPUS / case["file"]).read_bytes()
    response = requests.post(desk.dashboard.url + path, data=body, timeout=10, headers={k: v for k, v in headers.items() if v})
    assert response.status_code == case["status"], response.text[:300]
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert case["expect"] in error and "\n" not in error, error
    assert served(desk) == before and len(before) == 1
    assert api(desk, "GET", f"{API}/app-2").json()["site_reports"] == {}
    assert desk.dashboard.running() and "Traceback" not in desk.dashboard.log()


def test_every_admin_case_has_a_file_and_every_file_a_case():
    assert {c["file"] for c in ADMIN_CASES} == {f"admin/{p.name}" for p in (CORPUS / "admin").iterdir()}


# -- fleet-wide halts and site reports ------------------------------------------------------


def test_a_fleet_wide_halt_is_issued_when_events_breach_the_criteria(desk, role_keys):
    """Phase 0 allows one failure fleet-wide; one rollback at each site (neither site's own
    criteria breach) makes two, so the dashboard aborts (on_halt=rollback) by itself."""
    assert rollout(desk, "create", write_plan(desk, plan_fields())).returncode == 0
    forward(desk, "gw", GATEWAY_TOKEN, [
        {"id": 1, "received": time.time(), "record": update_event("r1", 1, "installed", "app-2", 0)},
        {"id": 2, "received": time.time(), "record": update_event("r1", 2, "rolled_back", "app-2", 0)},
        {"id": 3, "received": time.time(), "record": update_event("r5", 1, "installed", "other-rollout", 0)},
    ])
    forward(desk, "gw-b", SITE_B_TOKEN, [
        {"id": 1, "received": time.time(), "record": update_event("r2", 1, "installed", "app-2", 0)},
        {"id": 2, "received": time.time(), "record": update_event("r2", 2, "committed", "app-2", 0)},
    ], buffer_id="b0")
    status = api(desk, "GET", f"{API}/app-2").json()
    assert status["phases"][0]["sites"]["gw"]["failed"] == 1 and status["phases"][0]["sites"]["gw-b"]["committed"] == 1
    assert status["state"] == "active"  # one failure: within max_failures 1

    forward(desk, "gw-b", SITE_B_TOKEN, [
        {"id": 3, "received": time.time(), "record": update_event("r3", 1, "installed", "app-2", 0)},
        {"id": 4, "received": time.time(), "record": update_event("r3", 2, "blacklisted", "app-2", 0)},
    ], buffer_id="b0")
    halted = wait_until(lambda: (p := verified(served(desk)["app-2"], role_keys).plan).state != "active" and p, 20,
                        "the dashboard's own halt revision")
    assert (halted.state, halted.revision) == ("aborted", 2)
    assert halted.reason == "phase 0 fleet-wide: 2 failed, more than max_failures 1"
    line = desk.dashboard.wait_for_log(r"rollout app-2 revision 2 phase 0 halted fleet-wide \(aborted\): [^\n]*")
    assert "2 failed, more than max_failures 1" in line[0]
    status = api(desk, "GET", f"{API}/app-2").json()
    assert [(h["scope"], h["phase"], h["sites"]) for h in status["halts"]] == [("fleet", 0, ["gw", "gw-b"])]
    assert status["phases"][0]["halted"] and status["revisions"][-1]["actor"] == "fleet halt"
    assert desk.dashboard.new_log().count("halted fleet-wide") == 1


def test_a_resume_after_a_fleet_halt_judges_only_what_happens_after_it(desk, role_keys):
    """The fleet paused the rollout on two failures (max_failures 1). The operator looked, resumed
    (the revision carries halt_since): the old failures must not pause it again, and the next halt
    comes when two more fail after the resume. Before halt_since, evidence only grew, so every
    resume was paused again at the next check, whatever the operator had decided."""
    fields = plan_fields(on_halt="pause")
    assert rollout(desk, "create", write_plan(desk, fields)).returncode == 0
    forward(desk, "gw", GATEWAY_TOKEN, [
        {"id": n, "received": time.time(), "record": update_event(robot, 1, "rolled_back", "app-2", 0)}
        for n, robot in ((1, "r1"), (2, "r2"))])
    wait_until(lambda: verified(served(desk)["app-2"], role_keys).plan.state == "paused", 20, "the fleet's pause")
    result = rollout(desk, "resume", "app-2", "--reason", "r1 and r2 had a loose cable")
    assert result.returncode == 0, result.stderr
    resumed = verified(served(desk)["app-2"], role_keys).plan
    assert (resumed.revision, resumed.state) == (3, "active") and resumed.halt_since
    wait_until(lambda: time.time() >= resumed.halt_since_epoch + 1, 5, "the clock to pass the resume")  # events carry whole seconds
    forward(desk, "gw", GATEWAY_TOKEN, [
        {"id": 3, "received": time.time(), "record": update_event("r3", 1, "rolled_back", "app-2", 0)},
        {"id": 4, "received": time.time(), "record": update_event("r4", 1, "rolled_back", "app-2", 0)}])
    halted = wait_until(lambda: (p := verified(served(desk)["app-2"], role_keys).plan).revision > 3 and p, 20,
                        "the next fleet halt")
    assert (halted.revision, halted.state) == (4, "paused")
    assert halted.reason == "phase 0 fleet-wide: 2 failed, more than max_failures 1"  # r3 and r4 only
    status = api(desk, "GET", f"{API}/app-2").json()
    assert status["phases"][0]["sites"]["gw"]["failed"] == 4  # the console still shows every failure


def test_a_plan_that_cannot_be_judged_does_not_stop_the_fleet_halts(desk, role_keys):
    """A damaged revision row (written by hand into the live database: no request can make one)
    is logged and skipped; the other rollout (checked after it: ids in order) is still halted, and the
    dashboard keeps serving."""
    assert rollout(desk, "create", write_plan(desk, plan_fields())).returncode == 0
    conn = sqlite3.connect(desk.db, timeout=30)
    with conn:
        conn.execute("INSERT INTO rollout_revisions VALUES ('aaa-broken', 1, 'active', 4e9, x'7b7d', x'7b7d', 0, 'operator x', NULL)")
    conn.close()
    desk.dashboard.wait_for_log(r"rollout aaa-broken: fleet-wide check failed: PlanError: [^\n]+")
    forward(desk, "gw", GATEWAY_TOKEN, [
        {"id": n, "received": time.time(), "record": update_event(robot, 1, "rolled_back", "app-2", 0)}
        for n, robot in ((1, "r1"), (2, "r2"))])
    wait_until(lambda: verified(served_good(desk), role_keys).plan.state == "aborted", 20, "app-2 halted fleet-wide")
    assert desk.dashboard.running() and "Traceback" not in desk.dashboard.log()


def test_a_fleet_halt_is_issued_when_the_failure_is_forwarded_not_at_the_next_check(tmp_path, role_keys, built):
    """ROLLOUT_CHECK_INTERVAL=3600: the fleet-wide check runs at start and then only once an hour.
    A gateway forwarding the canary's rollback brings evidence the dashboard can act on: the halt
    revision is issued then, not up to an hour later, and gateways take it at their next poll."""
    desk = open_desk(tmp_path, role_keys, built, check_interval=3600)
    try:
        fields = plan_fields(phases=[{"robots": ["r1", "r2"], "halt": {"fleet": {"max_failures": 0, "min_attempts": 1}}},
                                     {"percent": 100}], on_halt="pause")
        assert api(desk, "POST", API, json=fields).status_code == 201
        forward(desk, "gw", GATEWAY_TOKEN, [
            {"id": 1, "received": time.time(), "record": update_event("r1", 1, "rolled_back", "app-2", 0)}])
        halted = wait_until(lambda: (p := verified(served(desk)["app-2"], role_keys).plan).state != "active" and p, 20,
                            "the dashboard's halt revision on the forwarded rollback")
        assert (halted.state, halted.revision) == ("paused", 2)
        assert halted.reason == "phase 0 fleet-wide: 1 failed, more than max_failures 0"
    finally:
        desk.stop_all()


def served_good(site: Site) -> dict:
    """app-2 from Wire 1 (the broken row is served as it is; gateways refuse it when they verify)."""
    response = requests.get(f"{site.dashboard.url}/rollouts.json", timeout=10)
    return next(item for item in response.json()["plans"] if '"rollout_id":"app-2"' in item["plan"])


def test_site_reports_are_kept_per_site_and_shown_in_status(desk):
    assert api(desk, "POST", API, json=plan_fields()).status_code == 201
    report = {"site": "gw", "rollout_id": "app-2", "revision": 1,
              "phases": [{"index": 0, "started_at": 1000.0, "halted_at": 1100.5, "reason": "phase 0 at site gw: 2 failed",
                          "counts": {"attempts": 2, "committed": 0, "failed": 2}}],
              "halted": {"at": 1100.5, "reason": "phase 0 at site gw: 2 failed"}}
    for _ in range(2):  # retried until 200: idempotent
        response = api(desk, "POST", "/rollouts/site-report", GATEWAY_TOKEN, json=report)
        assert response.status_code == 200 and response.json() == {"ok": True}
    status = api(desk, "GET", f"{API}/app-2").json()
    assert status["site_reports"]["gw"]["halted"] == report["halted"]
    assert [(h["scope"], h["sites"], h["reason"]) for h in status["halts"]] == [("site", ["gw"], "phase 0 at site gw: 2 failed")]
    assert status["phases"][0]["sites"]["gw"]["halted"]
    # The console page shows the report's halt, escaped (a reason is any printable line).
    hostile = {**report, "phases": [{**report["phases"][0], "reason": "<script>alert(1)</script>"}]}
    assert api(desk, "POST", "/rollouts/site-report", GATEWAY_TOKEN, json=hostile).status_code == 200
    page = requests.get(f"{desk.dashboard.url}/rollouts/app-2", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and "<script>alert" not in page.text
    assert requests.get(f"{desk.dashboard.url}/rollouts/nope", timeout=10).status_code == 404
    # A gateway speaks for its own site only, and about a rollout that exists.
    assert api(desk, "POST", "/rollouts/site-report", SITE_B_TOKEN, json=report).status_code == 403
    assert api(desk, "POST", "/rollouts/site-report", GATEWAY_TOKEN, json={**report, "rollout_id": "nope"}).status_code == 404


def test_the_status_counts_each_robot_once_by_its_outcome_and_follows_new_reports(desk, role_keys):
    """The status an operator reads (API and page) counts each robot of a phase once, by its outcome,
    however its events arrived: a rollback after a commit is a failure, an install older than
    install_timeout_s is a failure, events of other kinds or of phases the plan lacks count nothing.
    The next request shows what arrived since: an event, and a robot's new version (`targeted`)."""
    # Phase 0 tolerates the failures counted here: a fleet halt would abort the rollout (and take
    # it off /status) the moment the second one is forwarded.
    phases = plan_fields()["phases"]
    phases[0] = {**phases[0], "halt": {"fleet": {"max_failures": 10}}}
    assert api(desk, "POST", API, json=plan_fields(install_timeout_s=3600, phases=phases)).status_code == 201
    old = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 7200))
    rows = [update_event("r1", 1, "installed", "app-2", 0), update_event("r1", 2, "committed", "app-2", 0),
            {**update_event("r2", 1, "installed", "app-2", 0), "ts": old},
            update_event("r3", 1, "installed", "app-2", 0),
            update_event("r6", 1, "rejected", "app-2", 0), update_event("r6", 2, "committed", "app-2", 7),
            {**metric("r7", 1), "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]
    forward(desk, "gw", GATEWAY_TOKEN, [{"id": n, "received": time.time(), "record": r} for n, r in enumerate(rows, 1)])
    forward(desk, "gw", GATEWAY_TOKEN, [{"id": 8, "received": time.time(), "record": update_event("r1", 3, "rolled_back", "app-2", 0)}])
    forward(desk, "gw-b", SITE_B_TOKEN, [{"id": 1, "received": time.time(), "record": update_event("r4", 1, "committed", "app-2", 0)}],
            buffer_id="b0")

    def counts(doc: dict, phase: int, site: str) -> tuple:
        row = doc["phases"][phase]["sites"][site]
        return row["installing"], row["committed"], row["failed"]

    status = api(desk, "GET", f"{API}/app-2").json()
    assert counts(status, 0, "gw") == (1, 0, 2)  # r3 installing; r1 rolled back after its commit, r2 timed out
    assert counts(status, 0, "gw-b") == (0, 1, 0)
    assert [(p["installing"], p["committed"], p["failed"]) for p in status["phases"]] == [(1, 1, 2), (0, 0, 0), (0, 0, 0)]
    r7_phase = phase_of(verified(served(desk)["app-2"], role_keys).plan, "r7")
    assert r7_phase in (1, 2)  # r7 reported 1.0.0, a `from` version: targeted, waiting in its cohort's phase
    assert status["phases"][r7_phase]["sites"]["gw"]["waiting"] == 1
    page = requests.get(f"{desk.dashboard.url}/rollouts/app-2", timeout=10).text
    assert '<td class="n failed" data-label="failed">2</td>' in page

    forward(desk, "gw", GATEWAY_TOKEN, [
        {"id": 9, "received": time.time(), "record": update_event("r3", 2, "committed", "app-2", 0)},
        {"id": 10, "received": time.time(), "record": {**metric("r7", 2), "version": "0.9.0",
                                                       "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}])
    status = api(desk, "GET", f"{API}/app-2").json()
    assert counts(status, 0, "gw") == (0, 1, 2)
    assert status["phases"][r7_phase]["sites"]["gw"]["waiting"] == 0  # 0.9.0 is not one the plan moves
    listed = api(desk, "GET", API).json()["rollouts"]
    assert [(p["committed"], p["failed"]) for p in listed[0]["phases"]][0] == (2, 2)
    in_progress = requests.get(f"{desk.dashboard.url}/status.json", timeout=10).json()["rollouts"]
    assert [(r["rollout_id"], r["phases"][0]["committed"]) for r in in_progress] == [("app-2", 2)]
    # An aborted rollout leaves /status and stays on the console's list.
    assert api(desk, "POST", f"{API}/app-2/abort").status_code == 200
    assert requests.get(f"{desk.dashboard.url}/status.json", timeout=10).json()["rollouts"] == []
    assert [r["state"] for r in api(desk, "GET", API).json()["rollouts"]] == ["aborted"]


# -- kill -9 ----------------------------------------------------------------------------------


def stored_revisions(db: Path) -> dict[int, bytes]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return {rev: bytes(plan) for rev, plan in conn.execute("SELECT revision, plan FROM rollout_revisions WHERE rollout_id = 'app-2'")}
    finally:
        conn.close()


def test_kill9_loses_no_revision_and_never_reissues_a_number(desk, role_keys):
    """Operators pause and resume as fast as they can while the dashboard is killed with -9 at
    random moments: every revision it answered or served is held afterwards with the same
    bytes, revisions are 1..N without a gap, and each verifies under the rollout key."""
    assert api(desk, "POST", API, json=plan_fields()).status_code == 201
    answered: dict[int, str] = {}  # revision -> state the dashboard answered
    seen: dict[int, str] = {}  # revision -> plan bytes /rollouts.json served
    rng = random.Random(15)
    for cycle in range(8):
        stop = threading.Event()

        def steer():
            while not stop.is_set():
                try:
                    state = api(desk, "GET", f"{API}/app-2", timeout=2).json()["state"]
                    action = "resume" if state == "paused" else "pause"
                    response = api(desk, "POST", f"{API}/app-2/{action}", timeout=2)
                    if response.status_code == 200:
                        answered[response.json()["revision"]] = response.json()["state"]
                    item = served(desk)["app-2"]
                    seen[json.loads(item["plan"])["revision"]] = item["plan"]
                except (requests.RequestException, ValueError, KeyError, AssertionError):
                    pass

        workers = [threading.Thread(target=steer) for _ in range(2)]
        for worker in workers:
            worker.start()
        time.sleep(rng.uniform(0.2, 1.0))  # the moment of the kill, not a wait for a result
        desk.dashboard.kill9()
        stop.set()
        for worker in workers:
            worker.join(15)
        desk.dashboard.start()
    held = stored_revisions(desk.db)
    assert len(answered) > 8, "too few revisions issued to exercise the kills"
    assert sorted(held) == list(range(1, max(held) + 1))
    for revision, state in answered.items():
        assert json.loads(held[revision])["state"] == state, revision
    for revision, plan in seen.items():
        assert held[revision] == plan.encode(), revision
    latest = verified(served(desk)["app-2"], role_keys)
    assert latest.plan.revision == max(held)
