"""Staged rollouts at the site (issue 15): a real otad-gateway, real HTTP, real keys, real files.

The dashboard's rollout half (Wire 1 GET /rollouts.json, Wire 4 POST
/rollouts/site-report) is written in parallel, so `FleetSide` plays it: a small
real HTTP server in this test that serves plans signed here with
otad.rollout.signed.sign_plan and a rollout key from `otad-release keygen`,
records the site reports, and passes every other request (/manifest, /ota/...,
/metrics) to a real otad-dashboard. A FaultProxy in front of it is the WAN.
Robots are HTTP clients with their telemetry tokens (the robot's own checks
are another test's): they report their version and update events through the
gateway's POST /metrics, as the telemetry agent does, and ask GET /manifest.
"""
from __future__ import annotations

import calendar
import json
import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from fleet import GATEWAY_TOKEN, fetch_release, metric, post_records, robot_token, write_tokens
from harness import run_command, wait_until, write_config
from otad.demo.faultproxy import FaultProxy
from otad.rollout.signed import sign_plan
from otad.trust.keys import load_private_key
from rollouts import make_plan

# The rollout daemons' tests run once, in make check's first pass (current PyPI), and not again
# on the bookworm pins: they exercise otad's rollout logic through the same HTTP and crypto calls
# that the other daemon tests, which do run there, already cover (CI time).
pytestmark = pytest.mark.slow

ROBOTS = ["r1", "r2", "r3", "r4", "r5", "r6"]
ROLLOUT = "app-2.0.0"
PASS_HEADERS = ("If-None-Match", "If-Modified-Since", "Range", "If-Range", "Authorization", "Content-Type", "Content-Encoding")
BACK_HEADERS = ("ETag", "Last-Modified", "Content-Type", "Content-Range", "Accept-Ranges", "Cache-Control")


class FleetSide:
    """The dashboard's rollout half for the test; everything else goes to the real dashboard."""

    def __init__(self, upstream: str) -> None:
        self.items: list[dict] = []
        self.body: bytes | None = None  # raw Wire 1 body instead of `items` (hostile bodies)
        self.reports: list[dict] = []
        self.rewrite: dict[str, str] = {}  # path asked -> path fetched from the real dashboard (a lying dashboard)
        self.polls = 0
        self.report_auth: set[str] = set()
        fleet = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self):
                if self.path == "/rollouts.json":
                    fleet.polls += 1
                    body = fleet.body if fleet.body is not None else json.dumps({"plans": fleet.items}).encode()
                    self._answer(200, body, [("Content-Type", "application/json"), ("Cache-Control", "no-store")])
                    return
                self._pass("GET", None)

            do_HEAD = do_GET

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/rollouts/site-report":
                    fleet.reports.append(json.loads(body))
                    fleet.report_auth.add(self.headers.get("Authorization", ""))
                    self._answer(200, b'{"ok": true}', [("Content-Type", "application/json")])
                    return
                self._pass("POST", body)

            def _pass(self, method: str, body: bytes | None) -> None:
                headers = {k: self.headers[k] for k in PASS_HEADERS if self.headers.get(k)}
                path = fleet.rewrite.get(self.path, self.path)
                reply = requests.request(method, upstream + path, headers=headers, data=body, timeout=10)
                self._answer(reply.status_code, reply.content, [(k, reply.headers[k]) for k in BACK_HEADERS if k in reply.headers])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def latest_report(self) -> dict | None:
        return self.reports[-1] if self.reports else None


class RolloutSite:
    def __init__(self, site, role_keys, root: Path) -> None:
        self.site, self.root = site, root
        self.rollout_key = role_keys["rollout"][0]
        self.rollout_pub = role_keys["folder"] / "rollout.pub"
        self.stranger_key = role_keys["release"][0]  # a real key this gateway does not trust at all
        self.release_key = load_private_key(site.key.read_bytes(), b"test-password", site.key.name)
        self.tokens = write_tokens(root, ROBOTS)
        site.release("1.0.0")
        self.fleet = FleetSide(site.dashboard.url)
        self.wan = FaultProxy(("127.0.0.1", int(self.fleet.url.rsplit(":", 1)[1])))
        self.gw = None
        self.seq = {r: 0 for r in ROBOTS}

    def item(self, key=None, **overrides) -> dict:
        signed = sign_plan(make_plan(**overrides), key or self.rollout_key)
        return {"plan": signed.data.decode(), "bundle": json.loads(signed.bundle)}

    def start(self, **overrides):
        self.gw = self.site.gateway(self.wan.url, ROLLOUT_KEYS=self.rollout_pub, ROBOT_TOKENS_FILE=self.tokens["robots"],
                                    TOKEN_FILE=self.tokens["gateway_own"], **overrides).start()
        return self.gw

    def restart(self):
        self.gw = self.gw.start()
        return self.gw

    @property
    def state(self) -> Path:
        return self.root / "gw-state" / "rollout"

    def site_state(self) -> dict:
        return json.loads((self.state / "site.json").read_text())

    def report(self, robot: str, **record) -> None:
        self.seq[robot] += 1
        base = metric(robot, self.seq[robot])
        if record.get("type") == "event":
            base = {k: v for k, v in base.items() if k not in ("cpu", "mem", "health")}
            base.setdefault("detail", "")
        reply = post_records(self.gw.url, robot, [{**base, **record}])
        assert reply.status_code == 200, reply.text

    def event(self, robot: str, name: str, phase: int, version: str = "2.0.0") -> None:
        self.report(robot, type="event", event=name, version=version, detail="", rollout_id=ROLLOUT, phase=phase)

    def served(self, robot: str | None) -> str | None:
        headers = {"Authorization": f"Bearer {robot_token(robot)}"} if robot else {}
        reply = requests.get(f"{self.gw.url}/manifest", headers=headers, timeout=5)
        if reply.status_code == 404:
            return None
        assert reply.status_code == 200, reply.text
        return reply.json()["version"]

    def started(self, phase: int) -> bool:
        return f"rollout {ROLLOUT} phase {phase}: started at site gw" in self.gw.log()

    def close(self) -> None:
        self.wan.close()
        self.fleet.close()


@pytest.fixture
def rollsite(site, role_keys, tmp_path):
    s = RolloutSite(site, role_keys, tmp_path)
    yield s
    s.close()


def take_first_plan(s: RolloutSite, gateway: dict | None = None, **plan) -> None:
    """Gateway on 1.0.0, robots report 1.0.0, 2.0.0 is published and cached, then the plan is taken.
    `gateway`: more gateway.conf settings."""
    gw = s.start(**(gateway or {}))
    gw.wait_for_log(r"verified app 1\.0\.0")
    for robot in ROBOTS:
        s.report(robot)  # version 1.0.0
    s.site.release("2.0.0")
    gw.wait_for_log(r"verified app 2\.0\.0")  # no robot asks before the plan is there
    s.fleet.items = [s.item(**plan)]
    gw.wait_for_log(rf"rollout {ROLLOUT} phase 0: started")


def soaked(s: RolloutSite, phase: int, soak: int) -> None:
    """Wait until `phase` soaked `soak` seconds here and the gateway polled twice since: a next phase
    that was going to start has started by then."""
    started = float(s.site_state()["rollouts"][ROLLOUT]["started"][str(phase)])
    wait_until(lambda: time.time() > started + soak, soak + 30, f"phase {phase}'s soak to end")
    polls = s.fleet.polls
    wait_until(lambda: s.fleet.polls >= polls + 2, 30, "two more polls")


def two_phases(soak: int, **extra) -> dict:
    return dict(phases=[
        {"robots": ["r1", "r2"], "percent": 0, "min_soak_s": soak, "advance": "auto",
         "halt": {"site": {"max_failures": 0, "min_attempts": 1}}},
        {"robots": [], "percent": 100, "min_soak_s": 0, "advance": "auto", "halt": {}},
    ], offline_max_phase=0, **extra)


class PhaseWatch:
    """Asks every robot's /manifest over and over: a robot given 2.0.0 before its phase started is a violation."""

    def __init__(self, s: RolloutSite, phase_of: dict[str, int]) -> None:
        self.s, self.phase_of = s, phase_of
        self.violations: list[str] = []
        self.seen: dict[str, set] = {r: set() for r in phase_of}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            for robot, phase in self.phase_of.items():
                try:
                    version = self.s.served(robot)
                except requests.RequestException:
                    continue  # the gateway is being restarted
                self.seen[robot].add(version)
                # The log line is written under the lock that serving takes: read after, it is there.
                if version == "2.0.0" and not self.s.started(phase):
                    self.violations.append(f"{robot} (phase {phase}) was given 2.0.0 before its phase started")

    def stop(self) -> None:
        self.done.set()
        self.thread.join(30)


def test_robots_get_only_what_their_phase_allows_and_the_next_phase_starts_after_its_soak(rollsite):
    s = rollsite
    take_first_plan(s, **two_phases(soak=4))
    watch = PhaseWatch(s, {"r1": 0, "r2": 0, "r3": 1, "r4": 1, "r5": 1, "r6": 1})
    try:
        wait_until(lambda: s.served("r1") == "2.0.0" and s.served("r2") == "2.0.0", 20, "the canary to be given 2.0.0")
        assert s.served("r3") == "1.0.0"  # its own version while it waits
        for robot in ("r1", "r2"):
            s.report(robot, version="2.0.0")
            s.event(robot, "installed", 0)
            s.event(robot, "committed", 0)
        wait_until(lambda: s.started(1), 30, "phase 1 to start after the canary's soak")
        wait_until(lambda: all(s.served(r) == "2.0.0" for r in ROBOTS[2:]), 20, "phase 1 robots to be given 2.0.0")
    finally:
        watch.stop()
    assert watch.violations == []
    assert watch.seen["r3"] == {"1.0.0", "2.0.0"}
    started = {int(k): v for k, v in s.site_state()["rollouts"][ROLLOUT]["started"].items()}
    assert started[1] - started[0] >= 4, started
    offered = {tuple(e[:3]) for e in s.site_state()["rollouts"][ROLLOUT]["events"] if e[2] == "offered"}
    assert {("r1", 0, "offered"), ("r2", 0, "offered"), ("r3", 1, "offered")} <= offered
    # Wire 4: what the site decided, with the gateway's token.
    report = wait_until(lambda: (r := s.fleet.latest_report()) and r["phases"][1]["started_at"] and r, 20, "the site report")
    assert report["site"] == "gw" and report["rollout_id"] == ROLLOUT and report["revision"] == 1
    assert report["phases"][0]["counts"]["committed"] == 2 and report["halted"] is None
    assert s.fleet.report_auth == {f"Bearer {GATEWAY_TOKEN}"}


def test_a_site_halts_on_its_canarys_rollback_with_the_dashboard_unreachable(rollsite):
    s = rollsite
    take_first_plan(s, **two_phases(soak=5, on_halt="rollback", offline_policy="continue"))
    wait_until(lambda: s.served("r2") == "2.0.0", 20, "the canary to be given 2.0.0")
    s.report("r2", version="2.0.0")
    s.event("r2", "committed", 0)
    s.wan.refuse(True)  # the WAN goes down
    s.event("r1", "rolled_back", 0)
    s.gw.wait_for_log(rf"rollout {ROLLOUT} phase 0: site gw halted \(robots on the target return\): phase 0 at site gw: 1 failed")
    # on_halt=rollback: r2, which committed 2.0.0, is given the release it came from; the others keep 1.0.0.
    wait_until(lambda: s.served("r2") == "1.0.0", 10, "r2 to be sent back to 1.0.0")
    assert [s.served(r) for r in ("r1", "r3", "r4")] == ["1.0.0"] * 3
    s.gw.wait_for_log(r"sync failed")  # it is dark: decisions above were taken offline
    s.wan.refuse(False)
    report = wait_until(lambda: (r := s.fleet.latest_report()) and r["halted"] and r, 30, "the site report after the WAN returns")
    assert "phase 0 at site gw: 1 failed" in report["halted"]["reason"]
    assert report["phases"][0]["halted_at"] == report["halted"]["at"] and report["phases"][1]["started_at"] is None
    assert report["phases"][0]["counts"] == {"attempts": 2, "committed": 1, "failed": 1}
    soaked(s, 0, 5)
    assert not s.started(1) and s.served("r5") == "1.0.0"  # soaked, and it still goes no further


def test_a_resume_lifts_the_sites_own_halt_and_only_later_failures_halt_it_again(rollsite):
    """The site halted itself on r1's rollback (pause). The operator's resume (revision 2, with
    halt_since) must lift it: the site's old evidence is what the operator looked at. A failure
    after the resume halts the site again. Before halt_since the evidence only grew, so the site
    stayed halted under every revision."""
    s = rollsite
    take_first_plan(s, **two_phases(soak=3600, on_halt="pause"))
    s.event("r1", "rolled_back", 0)
    s.gw.wait_for_log(rf"rollout {ROLLOUT} phase 0: site gw halted \(robots keep what they have\)")
    assert s.served("r2") == "1.0.0"
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 1))
    s.fleet.items = [s.item(revision=2, halt_since=since, **two_phases(soak=3600, on_halt="pause"))]
    s.gw.wait_for_log(rf"rollout {ROLLOUT} phase 0: revision 2 lifts the site halt")
    wait_until(lambda: s.served("r2") == "2.0.0", 10, "the canary r2 to be given 2.0.0 again")
    resumed_at = calendar.timegm(time.strptime(since, "%Y-%m-%dT%H:%M:%SZ"))
    wait_until(lambda: time.time() > resumed_at, 5, "the clock to pass halt_since")
    s.event("r2", "rolled_back", 0)
    s.gw.wait_for_count(f"rollout {ROLLOUT} phase 0: site gw halted", 2)
    assert s.served("r2") == "1.0.0"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs as the gateway's STATE_DIR (needs root)")
def test_a_phase_start_that_could_not_be_saved_is_saved_and_logged_once_the_disk_has_room(rollsite):
    """The gateway's disk fills just as phase 1 is due. The start is decided in memory, the save
    fails ("cannot persist"); nothing new happens afterwards. Once there is room again, the next
    poll must save the start and log it. Before, the decision stayed in memory only, so serving
    followed a phase start that no file held and no journal line told (a restart would decide it
    again at another time). A real tmpfs, really full."""
    s = rollsite
    state = s.root / "gw-state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(state)], check=True, timeout=30)
    try:
        take_first_plan(s, **two_phases(soak=3))
        filler = state / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True, timeout=60)
        soaked(s, 0, 3)  # phase 1 was due, and two polls have passed since
        assert "rollout: cannot persist the site's rollout state" in s.gw.log()
        assert "phase 1: started" not in s.gw.log()
        filler.unlink()
        s.gw.wait_for_log(rf"rollout {ROLLOUT} phase 1: started at site gw", 10)
        assert "1" in s.site_state()["rollouts"][ROLLOUT]["started"]
    finally:
        s.gw.kill9()
        subprocess.run(["umount", "-l", str(state)], timeout=30)


@pytest.mark.parametrize("policy", ["hold", "continue"])
def test_a_dark_site_holds_or_continues_up_to_offline_max_phase(rollsite, policy):
    """Dark for longer than the soak: `hold` starts no phase until the dashboard is heard from again;
    `continue` starts phase 1 on its own and stops at offline_max_phase 1. A phase's start time says when
    it started, so one that started in the dark would be dated before the WAN came back."""
    s = rollsite
    phases = [{"robots": [r], "percent": 0, "min_soak_s": soak, "advance": "auto", "halt": {}}
              for r, soak in (("r1", 4), ("r2", 1), ("r3", 1))]
    s.fleet.items = [s.item(phases=phases, offline_policy=policy, offline_max_phase=1, on_halt="pause")]
    gw = s.start()
    gw.wait_for_log(rf"rollout {ROLLOUT} phase 0: started")
    s.wan.refuse(True)
    started0 = wait_until(lambda: (s.state / "site.json").exists() and s.site_state()["rollouts"][ROLLOUT]["started"].get("0"),
                          10, "phase 0's start time on disk")
    if policy == "hold":
        gw.wait_for_log(r"offline_policy=hold: no new phase")
    else:
        gw.wait_for_log(rf"rollout {ROLLOUT} phase 1: started")
        gw.wait_for_log(r"phase 2 is beyond offline_max_phase 1")
    wait_until(lambda: time.time() > started0 + 4 + 1 + 4, 30, "the dark site to be past both soaks and a few polls")
    back = time.time()
    s.wan.refuse(False)
    wait_until(lambda: s.started(2), 30, "the phases to go on once the dashboard is heard from")
    started = {int(k): v for k, v in s.site_state()["rollouts"][ROLLOUT]["started"].items()}
    assert started[2] >= back
    if policy == "hold":
        assert started[1] >= back
    else:
        assert started0 + 4 <= started[1] < back


def test_an_old_revision_replayed_by_the_dashboard_url_is_refused_also_after_a_restart(rollsite):
    s = rollsite
    revision1 = s.item(**two_phases(soak=0))
    revision2 = s.item(**two_phases(soak=0), revision=2, state="paused", reason="operator paused")
    take_first_plan(s, **two_phases(soak=0))
    s.fleet.items = [revision2]
    s.gw.wait_for_log(rf"rollout {ROLLOUT}: took revision 2 \(paused")
    s.fleet.items = [revision1]
    s.gw.wait_for_log(rf"refused revision 1: plan {ROLLOUT} revision 1 is older than revision 2, already seen: a replay")
    assert s.served("r3") == "1.0.0" and s.served("r1") == "1.0.0"  # paused: nobody moves
    s.gw.kill9()
    s.restart()
    s.gw.wait_for_log(rf"refused revision 1: plan {ROLLOUT} revision 1 is older than revision 2")
    assert s.served("r1") == "1.0.0"
    plans = requests.get(f"{s.gw.url}/rollout.json", headers={"Authorization": f"Bearer {robot_token('r1')}"}, timeout=5).json()
    assert [json.loads(p["plan"])["revision"] for p in plans["plans"]] == [2]


@pytest.mark.parametrize("signer", ["untrusted", "release"])
def test_a_plan_signed_by_an_untrusted_key_or_by_the_release_key_is_refused(rollsite, signer):
    s = rollsite
    key = s.stranger_key if signer == "untrusted" else s.release_key
    s.fleet.items = [s.item(key=key, **two_phases(soak=0))]
    gw = s.start()
    expect = "signed by an unknown key" if signer == "untrusted" else "signed by the release key release.pub"
    gw.wait_for_log(rf"rollout: refused plan \(item 0 of rollouts.json\): .*{expect}")
    assert not (s.state / "plans.json").exists()
    reply = requests.get(f"{gw.url}/rollout.json", headers={"Authorization": f"Bearer {robot_token('r3')}"}, timeout=5)
    assert reply.json() == {"plans": []}


def test_kill9_mid_rollout_keeps_phase_start_times_and_counts(rollsite):
    s = rollsite
    take_first_plan(s, **two_phases(soak=3600))
    wait_until(lambda: s.served("r1") == "2.0.0", 20, "the canary to be given 2.0.0")
    s.report("r1", version="2.0.0")
    s.event("r1", "committed", 0)
    before = s.site_state()["rollouts"][ROLLOUT]
    s.gw.kill9()
    s.wan.refuse(True)  # it comes back dark: only what it persisted counts
    s.restart()
    watch = PhaseWatch(s, {"r2": 0, "r3": 1, "r4": 1})
    try:
        wait_until(lambda: s.served("r2") == "2.0.0", 20, "the canary to be given 2.0.0 from the kept plan")
        s.gw.wait_for_log(r"sync failed")
    finally:
        watch.stop()
    assert watch.violations == [] and watch.seen["r3"] == {"1.0.0"}
    after = s.site_state()["rollouts"][ROLLOUT]
    assert after["started"] == before["started"]
    assert [e for e in after["events"] if e[2] == "committed"] == [e for e in before["events"] if e[2] == "committed"]
    s.wan.refuse(False)
    report = wait_until(lambda: (r := s.fleet.latest_report()) and r["phases"][0]["counts"]["committed"] == 1 and r, 30, "report")
    assert report["phases"][0]["started_at"] == before["started"]["0"]


def test_manifest_wants_a_robot_token_unless_the_compatibility_switch(rollsite):
    s = rollsite
    gw = s.start()
    gw.wait_for_log(r"verified app 1\.0\.0")
    reply = requests.get(f"{gw.url}/manifest", timeout=5)
    assert reply.status_code == 401 and "bearer token" in reply.json()["error"]
    assert requests.get(f"{gw.url}/manifest", headers={"Authorization": "Bearer wrong"}, timeout=5).status_code == 401
    assert requests.get(f"{gw.url}/rollout.json", timeout=5).status_code == 401
    assert s.served("r1") == "1.0.0"  # with its token
    gw.stop()
    config = Path(str(gw.config))
    config.write_text(config.read_text() + "MANIFEST_ALLOW_ANONYMOUS=1\n")
    gw.start()
    assert s.served(None) == "1.0.0"


def test_without_rollout_keys_the_manifest_is_the_newest_for_all_without_a_token(site):
    site.release("1.0.0")
    gw = site.gateway().start()
    gw.wait_for_log(r"verified app 1\.0\.0")
    assert requests.get(f"{gw.url}/manifest", timeout=5).json()["version"] == "1.0.0"
    assert requests.get(f"{gw.url}/rollout.json", timeout=5).json() == {"plans": []}


def test_a_rollout_key_that_is_also_a_release_key_is_refused_at_config_check(site, tmp_path):
    config = write_config(tmp_path / "bad.conf", {"DASHBOARD_URL": "http://127.0.0.1:9", "TRUSTED_KEYS": site.pub,
                                                  "ROLLOUT_KEYS": site.pub, "STATE_DIR": tmp_path / "s"})
    result = run_command("otad-gateway", "--config", str(config), "--check-config")
    assert result.returncode == 1
    assert "ROLLOUT_KEYS" in result.stderr and "is also a release key" in result.stderr


def test_gc_never_evicts_a_version_a_current_plan_assigns(rollsite):
    """CACHE_KEEP_VERSIONS=1 would evict 1.0.0 once 2.0.0 is cached; the plan moves robots from 1.0.0
    (and on_halt=rollback returns them there), so it stays and robots waiting for their phase get it."""
    s = rollsite
    s.fleet.items = [s.item(**two_phases(soak=3600, on_halt="rollback"))]
    gw = s.start(CACHE_KEEP_VERSIONS=1)
    gw.wait_for_log(r"verified app 1\.0\.0")
    gw.wait_for_log(rf"rollout {ROLLOUT}: took revision 1")
    s.site.release("2.0.0")
    gw.wait_for_log(r"verified app 2\.0\.0")
    s.site.release("2.1.0")  # beyond the plan: GC may take the older unassigned versions, never 1.0.0 or 2.0.0
    gw.wait_for_log(r"verified app 2\.1\.0")
    files = {p.name for p in (s.root / "gw-state" / "cache" / "files").iterdir()}
    assert {"app-v1.0.0.tar.gz", "app-v2.0.0.tar.gz", "app-v2.1.0.tar.gz"} <= files, files
    for robot in ROBOTS:
        s.report(robot)
    assert s.served("r3") == "1.0.0" and s.served("r1") == "2.0.0"


def test_a_fleet_abort_wins_over_the_sites_own_advance(rollsite):
    s = rollsite
    plan = two_phases(soak=6, on_halt="rollback")
    take_first_plan(s, **plan)
    wait_until(lambda: s.served("r1") == "2.0.0", 20, "the canary to be given 2.0.0")
    s.report("r1", version="2.0.0")
    s.event("r1", "committed", 0)
    s.fleet.items = [s.item(**plan, revision=2, state="aborted", reason="phase 0 fleet-wide: 3 failed")]
    s.gw.wait_for_log(rf"rollout {ROLLOUT}: took revision 2 \(aborted")
    s.gw.wait_for_log(rf"rollout {ROLLOUT} phase 0: rollout {ROLLOUT} is aborted: phase 0 fleet-wide: 3 failed")
    assert s.served("r1") == "1.0.0"  # on_halt=rollback: back to where it came from
    soaked(s, 0, 6)
    assert not s.started(1) and s.served("r3") == "1.0.0"
    report = wait_until(lambda: (r := s.fleet.latest_report()) and r["revision"] == 2 and r, 20, "the report of revision 2")
    assert report["phases"][1]["started_at"] is None


def test_hostile_wire1_bodies_are_refused_and_the_kept_plan_stays(rollsite):
    """tests/corpus/wire1-cases.json through a real gateway, plus cases signed now: each is refused with
    its one-line reason, the gateway keeps running and keeps carrying out the plan it had."""
    s = rollsite
    take_first_plan(s, **two_phases(soak=3600))
    corpus = Path(__file__).parent / "corpus"
    cases = [(c["id"], (corpus / c["file"]).read_bytes(), c["expect"]) for c in json.loads((corpus / "wire1-cases.json").read_text())]
    good = s.item(**two_phases(soak=3600), revision=3)
    pretty = {**good, "plan": json.dumps(json.loads(good["plan"]), indent=1)}
    expired = s.item(**two_phases(soak=3600), revision=3, expires="2020-01-01T00:00:00Z")
    tampered = {**good, "plan": good["plan"].replace('"min_soak_s":3600', '"min_soak_s":0')}
    cases += [("non-canonical", json.dumps({"plans": [pretty]}).encode(), "not in canonical form"),
              ("expired", json.dumps({"plans": [expired]}).encode(), "expired at 2020-01-01T00:00:00Z"),
              ("tampered", json.dumps({"plans": [tampered]}).encode(), "the bundle signs other bytes than this plan")]
    for case, body, expect in cases:
        offset = len(s.gw.log())
        s.fleet.body = body
        wait_until(lambda: expect in s.gw.log()[offset:], 20, f"case {case}: the gateway to log {expect!r}")
        assert s.gw.running(), case
    plans = requests.get(f"{s.gw.url}/rollout.json", headers={"Authorization": f"Bearer {robot_token('r1')}"}, timeout=5).json()
    assert [json.loads(p["plan"])["revision"] for p in plans["plans"]] == [1]
    assert s.served("r1") == "2.0.0" and s.served("r3") == "1.0.0"


def test_every_wire1_corpus_file_has_a_row_and_every_row_a_file():
    corpus = Path(__file__).parent / "corpus"
    rows = {c["file"] for c in json.loads((corpus / "wire1-cases.json").read_text())}
    files = {f"wire1/{p.name}" for p in (corpus / "wire1").iterdir()}
    assert rows == files


def test_an_approve_phase_waits_for_the_operators_signed_approval(rollsite):
    s = rollsite
    plan = two_phases(soak=0)
    plan["phases"][0]["advance"] = "approve"
    take_first_plan(s, **plan)
    s.gw.wait_for_log(rf"rollout {ROLLOUT} phase 0: phase 1 waits for an operator's approval")
    assert not s.started(1) and s.served("r3") == "1.0.0"
    s.fleet.items = [s.item(**plan, revision=2, approved_phase=1)]
    wait_until(lambda: s.started(1), 20, "phase 1 to start once approved")
    assert s.served("r3") == "2.0.0"


def test_with_the_real_dashboard_plans_reports_and_an_approval_flow_end_to_end(tmp_path, role_keys):
    """No test server in between: a real otad-dashboard holding the rollout key (tests/test_rollout_dashboard.py's
    open_desk) serves Wire 1 and takes Wire 4 from a real gateway; the operator's approval reaches the site."""
    from conftest import otad_release as release_cli
    from fleet import Site
    from test_rollout_dashboard import API, api, open_desk, plan_fields

    assert release_cli("keygen", "--output-prefix", str(tmp_path / "release")).returncode == 0
    built = Site(tmp_path, tmp_path / "release.key", tmp_path / "release.pub")
    built.outs = [built.build("2.0.0", size=1024)]
    (tmp_path / "desk").mkdir()
    desk = open_desk(tmp_path / "desk", role_keys, built)
    try:
        (desk.root / "robot-tokens").write_text("".join(f"{r} {robot_token(r)}\n" for r in ROBOTS))
        gw = desk.gateway(ROLLOUT_KEYS=role_keys["folder"] / "rollout.pub", ROBOT_TOKENS_FILE=desk.root / "robot-tokens",
                          TOKEN_FILE=desk.tokens["gateway_own"]).start()
        gw.wait_for_log(r"verified app 2\.0\.0")
        assert api(desk, "POST", API, json=plan_fields()).status_code == 201
        gw.wait_for_log(r"rollout app-2: took revision 1 \(active, target 2\.0\.0\)")
        gw.wait_for_log(r"rollout app-2 phase 0: phase 1 waits for an operator's approval")
        for robot in ROBOTS:  # on 1.0.0, which this gateway never cached
            assert post_records(gw.url, robot, [metric(robot, 1)]).status_code == 200

        def manifest(robot: str) -> requests.Response:
            return requests.get(f"{gw.url}/manifest", headers={"Authorization": f"Bearer {robot_token(robot)}"}, timeout=5)

        assert manifest("r1").json()["version"] == "2.0.0"  # the canary
        waiting = manifest("r5")  # phase 1 or 2: nothing for it yet, and never the target
        assert waiting.status_code == 404 and "no release for robot r5 now" in waiting.json()["error"]
        status = wait_until(lambda: (d := api(desk, "GET", f"{API}/app-2").json()) and "gw" in d["site_reports"] and d,
                            30, "the dashboard to show the site's report")
        assert status["site_reports"]["gw"]["phases"][0]["started_at"] is not None
        assert api(desk, "POST", f"{API}/app-2/approve", json={}).status_code == 200
        gw.wait_for_log(r"rollout app-2 phase 1: started at site gw")
    finally:
        desk.stop_all()


def test_a_site_halt_is_decided_on_the_post_metrics_that_carries_the_failure_before_the_next_poll(rollsite):
    """POLL_INTERVAL=3600: the gateway polls once, at start, and takes the plan then. The canary's
    rollback is then the only new evidence: the POST /metrics that carries it is answered after the
    site has halted, so no robot is handed the target in between (not after the next poll, and not
    only after a dark site's backoff, which can be BACKOFF_MAX long)."""
    s = rollsite
    s.site.release("2.0.0")
    s.fleet.items = [s.item(**two_phases(soak=3600, on_halt="pause"))]
    gw = s.start(POLL_INTERVAL=3600)
    gw.wait_for_log(rf"rollout {ROLLOUT} phase 0: started")
    for robot in ROBOTS:
        s.report(robot)  # version 1.0.0
    assert s.served("r2") == "2.0.0"  # the canary is offered the target
    polls = s.fleet.polls
    s.event("r1", "rolled_back", 0)
    assert s.site_state()["rollouts"][ROLLOUT]["halted"]["reason"] == "phase 0 at site gw: 1 failed, more than max_failures 0"
    assert s.served("r2") != "2.0.0"  # halted: r2, which had not started, is not handed it any more
    assert f"rollout {ROLLOUT} phase 0: site gw halted (robots keep what they have)" in gw.log()
    assert s.fleet.polls == polls  # no poll came in between: the POST itself decided


def cached_versions(s: RolloutSite) -> set[str]:
    return {p.stem for p in (s.root / "gw-state" / "cache" / "versions").glob("*.json")}


def test_a_gateway_started_after_newer_releases_caches_what_its_plan_assigns_not_only_the_newest(rollsite):
    """The dashboard's newest is 3.0.0; the plan moves robots from 1.0.0 to 2.0.0 with on_halt=rollback.
    A gateway that never saw 1.0.0 or 2.0.0 as the newest fetches both by version (one log line each),
    serves 2.0.0 to the canary with its token and 1.0.0 back after the halt, keeps 3.0.0 as its newest
    release (cache manifest.json, floor, anonymous view) and GC (CACHE_KEEP_VERSIONS=1) keeps all three
    while the plan is current, also across a restart."""
    s = rollsite  # 1.0.0 is published
    s.site.release("2.0.0")
    s.site.release("3.0.0")
    s.fleet.items = [s.item(**two_phases(soak=3600, on_halt="rollback"))]
    gw = s.start(CACHE_KEEP_VERSIONS=1)
    gw.wait_for_log(r"verified app 3\.0\.0 .*serving it to robots")
    for version in ("1.0.0", "2.0.0"):
        gw.wait_for_log(rf"verified app {version.replace('.', '[.]')} .*cached for the rollout plans that assign it, "
                        r"not as the newest release \(still 3\.0\.0\)")
    for robot in ROBOTS:
        s.report(robot)  # on 1.0.0
    assert s.served("r1") == "2.0.0" and s.served("r2") == "2.0.0"  # the canary
    assert s.served("r3") == "1.0.0"  # waiting for its phase: its own version
    given = requests.get(f"{gw.url}/manifest", headers={"Authorization": f"Bearer {robot_token('r1')}"}, timeout=5).json()
    fetch_release(gw.url, given)  # the artifact, its signature and checksum file are served whole
    assert requests.get(f"{gw.url}/healthz", timeout=5).json()["release"] == "3.0.0"
    state = s.root / "gw-state"
    assert json.loads((state / "cache" / "manifest.json").read_text())["version"] == "3.0.0"
    assert json.loads((state / "release-floor.json").read_text())["highest"] == "3.0.0"
    assert cached_versions(s) == {"1.0.0", "2.0.0", "3.0.0"}
    # on_halt=rollback: r2 committed 2.0.0, the canary r1 rolled back; r2 is sent back to 1.0.0.
    s.report("r2", version="2.0.0")
    s.event("r2", "committed", 0)
    s.event("r1", "rolled_back", 0)
    gw.wait_for_log(rf"rollout {ROLLOUT} phase 0: site gw halted")
    wait_until(lambda: s.served("r2") == "1.0.0", 10, "r2 to be sent back to 1.0.0")
    polls = s.fleet.polls
    wait_until(lambda: s.fleet.polls >= polls + 2, 30, "two more polls")
    assert gw.log().count("cached for the rollout plans") == 2  # fetched once each, not every poll
    s.gw.kill9()
    s.restart()
    assert s.served("r2") == "1.0.0" and s.served("r3") == "1.0.0"
    assert requests.get(f"{s.gw.url}/healthz", timeout=5).json()["release"] == "3.0.0"
    polls = s.fleet.polls
    wait_until(lambda: s.fleet.polls >= polls + 2, 30, "two polls after the restart")
    assert cached_versions(s) == {"1.0.0", "2.0.0", "3.0.0"}
    assert "cached for the rollout plans" not in s.gw.new_log()


@pytest.mark.parametrize("case", ["untrusted-key", "expired", "another-version"])
def test_a_kept_pair_that_fails_verification_is_refused_once_and_the_newest_stays(rollsite, role_keys, case):
    """2.0.0's kept pair at the dashboard is signed by a key this gateway does not trust, has expired, or
    (a lying dashboard) is 3.0.0's genuine pair served under 2.0.0's name: it is refused with one log line
    (held back, not fetched again every poll), 1.0.0 is still fetched, and the newest release (3.0.0)
    and the floor are untouched."""
    s = rollsite
    if case == "untrusted-key":
        s.site.publish(s.site.build("2.0.0", key=role_keys["folder"] / "release.key"))
        expect = "signed by an unknown key"
    elif case == "expired":
        s.site.publish(s.site.build("2.0.0", args=("--expires-in", "-1")))
        expect = "expired at"
    else:
        s.site.release("2.0.0")
        for tail in ("manifest", "manifest.bundle"):
            s.fleet.rewrite[f"/releases/2.0.0/{tail}"] = f"/releases/3.0.0/{tail}"
        expect = "the manifest served for 2.0.0 is of 3.0.0"
    s.site.release("3.0.0")
    s.fleet.items = [s.item(**two_phases(soak=3600))]
    gw = s.start()
    gw.wait_for_log(r"verified app 3\.0\.0 .*serving it to robots")
    line = gw.wait_for_log(r"rejected app 2\.0\.0, which a rollout plan needs \(/releases/2\.0\.0/manifest\): .*; "
                           r"still serving app 3\.0\.0 as the newest")
    gw.wait_for_log(r"verified app 1\.0\.0 .*cached for the rollout plans")
    polls = s.fleet.polls
    wait_until(lambda: s.fleet.polls >= polls + 3, 30, "three more polls")
    log = gw.log()
    assert expect in line.group(0), line.group(0)
    assert log.count("rejected app 2.0.0") == 1, log[-2000:]
    assert cached_versions(s) == {"1.0.0", "3.0.0"}
    assert not (s.root / "gw-state" / "cache" / "files" / "app-v2.0.0.tar.gz").exists()
    for robot in ROBOTS:
        s.report(robot)
    assert s.served("r1") == "1.0.0"  # its target is not cached: it keeps its own version
    assert requests.get(f"{gw.url}/healthz", timeout=5).json()["release"] == "3.0.0"
    assert json.loads((s.root / "gw-state" / "release-floor.json").read_text())["highest"] == "3.0.0"
    assert gw.running() and "Traceback" not in log


def test_a_robot_that_was_away_gets_the_release_its_plan_assigns_not_the_newest(rollsite):
    """A real otad-robot with ROLLOUT_KEYS and a real telemetry agent come up at a site whose gateway
    started after 3.0.0 was published. A base plan brings the robot to 1.0.0; the plan for 2.0.0 names it
    in its canary. The gateway holds 1.0.0 and 2.0.0 only because it fetched them by version; the robot
    verifies the plan itself and installs 2.0.0, never 3.0.0 (which no plan assigns)."""
    from invariants import current_version

    s = rollsite
    s.site.release("2.0.0")
    s.site.release("3.0.0")
    base = s.item(rollout_id="base-1.0.0", version="1.0.0", **{"from": []}, offline_max_phase=0,
                  phases=[{"robots": [], "percent": 100, "min_soak_s": 0, "advance": "auto", "halt": {}}])
    s.fleet.items = [base, s.item(**two_phases(soak=3600))]
    gw = s.start()
    gw.wait_for_log(r"verified app 3\.0\.0 .*serving it to robots")
    agent = s.site.agent(gw.url, "r1")
    robot = s.site.robot(gw.url, "r1", ROLLOUT_KEYS=s.rollout_pub, TOKEN_FILE=s.root / "r1-agent.token")
    agent.start(wait_listening=False)
    robot.start(wait_listening=False)
    app = s.root / "r1-app"
    wait_until(lambda: current_version(app) == "1.0.0", 60, "the robot on 1.0.0 from the base plan")
    wait_until(lambda: current_version(app) == "2.0.0", 60, "the robot on 2.0.0, which its plan assigns")
    robot.wait_for_log(r"rollout app-2\.0\.0 revision 1 assigns app 2\.0\.0 to robot r1")
    robot.wait_for_log(r"installed app 2\.0\.0")
    assert "downloading app 3.0.0" not in robot.log() and not (app / "releases" / "3.0.0").exists()
    assert requests.get(f"{gw.url}/healthz", timeout=5).json()["release"] == "3.0.0"
