"""The robot side of site orchestration (issue 16): a real otad-robot, a real otad-gateway, real HTTP.

Readiness (READY_CMD, INHIBIT_FILE), download-ahead, and the install lease of
Wire 5 (`POST /lease`: request, renew, release, defer) between a real robot and
the real gateway's lease table (STATE_DIR/orchestration/leases.json, read back
as the gateway wrote it). A second robot's token takes a lease by a direct
POST, as that robot's daemon would. The old gateway answering 404 is
HostileServer (tests/test_hostile_release.py), which knows no POST at all.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import requests

from fleet import Site, robot_token, write_tokens
from harness import run_command, wait_until
from invariants import current_version, robot_state
from test_hostile_release import HostileServer

pytestmark = pytest.mark.slow  # a daemon test: run once, in make check's first pass (as test_rollout_gateway.py)

TIMEOUT = 30
CORPUS = Path(__file__).parent / "corpus"
ANSWER_CASES = json.loads((CORPUS / "lease-answer-cases.json").read_text())
ROBOT = "r1"
OTHER = "r2"


@pytest.fixture
def orch(site):
    """conftest's site with 1.0.0 published, robot tokens for r1 and r2, and a helper to start the gateway."""
    site.tokens = write_tokens(site.root, [ROBOT, OTHER])
    site.token_file = site.root / f"{ROBOT}.token"
    site.token_file.write_text(robot_token(ROBOT) + "\n")
    site.token_file.chmod(0o600)
    site.release("1.0.0")
    return site


def start_gateway(site: Site, **overrides):
    values = {"ROBOT_TOKENS_FILE": site.tokens["robots"], "SITE_MAX_CONCURRENT": 1, "LEASE_RETRY_S": 1, **overrides}
    site.gw = site.gateway(**values).start()
    return site.gw


def start_robot(site: Site, env: dict | None = None, **overrides):
    return site.robot(site.gw.url, ROBOT, env=env, TOKEN_FILE=site.token_file, **overrides).start(wait_listening=False)


def app(site: Site) -> Path:
    return site.root / f"{ROBOT}-app"


def state(site: Site) -> Path:
    return site.root / f"{ROBOT}-state"


def on_version(site: Site, version: str, timeout: float = TIMEOUT) -> None:
    """The robot idle on `version`, its lease (if any) given back: the release follows the commit."""
    wait_until(lambda: current_version(app(site)) == version and robot_state(state(site))["phase"] == "idle"
               and lease_of(site, ROBOT) is None, timeout, f"robot on {version}, holding no lease")


def status(site: Site) -> dict:
    result = run_command("otadctl", "--config", str(site.root / f"{ROBOT}.conf"), "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def update_line(site: Site) -> str:
    result = run_command("otadctl", "--config", str(site.root / f"{ROBOT}.conf"), "status")
    assert result.returncode == 0, result.stderr
    return next(line for line in result.stdout.splitlines() if line.startswith("update:")).split(None, 1)[1]


def showing(site: Site, fragment: str) -> str:
    """Wait until `otadctl status` shows an update line holding `fragment`; return it."""
    return wait_until(lambda: fragment in (line := update_line(site)) and line, TIMEOUT, f"otadctl status to show {fragment!r}")


def lease_call(site: Site, robot: str, doc: dict) -> dict:
    """One POST /lease with `robot`'s token, as that robot's daemon sends it."""
    response = requests.post(f"{site.gw.url}/lease", data=json.dumps(doc), timeout=10,
                             headers={"Authorization": f"Bearer {robot_token(robot)}", "Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    return response.json()


def table(site: Site) -> dict:
    """The gateway's lease table as persisted."""
    path = site.root / "gw-state" / "orchestration" / "leases.json"
    return json.loads(path.read_text()) if path.exists() else {"leases": [], "queue": []}


def lease_of(site: Site, robot: str) -> dict | None:
    return next((lease for lease in table(site)["leases"] if lease["robot"] == robot), None)


def ready_script(site: Site, code: int, said: str = "") -> Path:
    """READY_CMD's script: exits `code` after printing `said`; counts its runs in ready.runs."""
    script = site.root / "ready.sh"
    script.write_text(f"#!/bin/sh\necho run >> {site.root / 'ready.runs'}\n{f'echo {said}' if said else ''}\nexit {code}\n")
    script.chmod(0o755)
    return script


def ready_runs(site: Site) -> int:
    path = site.root / "ready.runs"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_ready_cmd_75_defers_the_install_until_it_answers_0(orch):
    site = orch
    start_gateway(site)
    script = ready_script(site, 0)
    robot = start_robot(site, READY_CMD=script, READY_RETRY_S=60)
    on_version(site, "1.0.0")
    ready_script(site, 75, "retry-after=3")
    site.release("2.0.0")
    line = showing(site, "deferred by READY_CMD: retry-after=3")
    assert status(site)["update"] == line
    runs = ready_runs(site)
    # It keeps asking at the interval the command named, and stays on its version meanwhile.
    wait_until(lambda: ready_runs(site) >= runs + 2, TIMEOUT, "READY_CMD asked again after retry-after=3")
    assert current_version(app(site)) == "1.0.0"
    assert robot.log().count("deferred by READY_CMD: retry-after=3") == 1  # one journal line per decision, not per run
    ready_script(site, 0)
    asked = time.monotonic()
    on_version(site, "2.0.0", timeout=3 + 10)  # one retry interval, plus the install itself
    assert time.monotonic() - asked < 3 + 10
    assert update_line(site) == "-"
    assert robot.log().count("downloading app 2.0.0") == 1  # downloaded ahead, once


def test_a_robot_no_longer_ready_when_granted_gives_the_lease_back_as_withdrawn(orch):
    """The final check right before the app stops: READY_CMD said 0 when the robot joined the queue,
    75 by the time its turn came. It must not install, and must give the lease back at once."""
    site = orch
    start_gateway(site)
    script = ready_script(site, 0)
    robot = start_robot(site, READY_CMD=script, READY_RETRY_S=60)
    on_version(site, "1.0.0")
    held = lease_call(site, OTHER, {"op": "request", "version": "2.0.0"})
    assert held["state"] == "granted", held
    site.release("2.0.0")
    showing(site, "waiting for lease (0 ahead)")
    ready_script(site, 75, "retry-after=2")
    lease_call(site, OTHER, {"op": "release", "lease": held["lease"], "outcome": "committed"})
    line = wait_until(lambda: re.search(r"released lease \d+: app 2.0.0, robot r1, withdrawn", robot.log()) and robot.log(),
                      TIMEOUT,
                      "the lease given back as withdrawn")
    assert "lease" not in update_line(site) and "deferred by READY_CMD: retry-after=2" in update_line(site)
    assert "installed app 2.0.0" not in line and current_version(app(site)) == "1.0.0"
    assert lease_of(site, ROBOT) is None
    ready_script(site, 0)
    on_version(site, "2.0.0")


def test_outside_the_window_the_robot_shows_the_gateways_reason_verbatim(orch):
    site = orch
    opens = time.gmtime(time.time() + 2 * 3600)
    closes = time.gmtime(time.time() + 3 * 3600)
    spec = f"Mon-Sun {opens.tm_hour:02d}:{opens.tm_min:02d}-{closes.tm_hour:02d}:{closes.tm_min:02d}"
    start_gateway(site, MAINTENANCE_WINDOWS=spec, SITE_TIMEZONE="UTC")
    start_robot(site)
    line = showing(site, "outside window")
    assert line == f"outside window until {opens.tm_hour:02d}:{opens.tm_min:02d}"
    assert lease_call(site, OTHER, {"op": "request", "version": "1.0.0"})["reason"] == line
    assert current_version(app(site)) is None and lease_of(site, ROBOT) is None


def test_inhibit_file_blocks_the_install_and_its_removal_lets_it_proceed(orch):
    site = orch
    start_gateway(site)
    busy = site.root / "mission.busy"
    robot = start_robot(site, INHIBIT_FILE=busy)
    on_version(site, "1.0.0")
    busy.write_text("carrying a load\n")
    site.release("2.0.0")
    showing(site, f"inhibited by {busy}")
    # Download and verification need no permission: the release waits verified on disk.
    wait_until(lambda: "verified app 2.0.0" in robot.log(), TIMEOUT, "2.0.0 verified while inhibited")
    assert current_version(app(site)) == "1.0.0"
    assert lease_of(site, ROBOT) is None
    busy.unlink()
    on_version(site, "2.0.0")


def test_download_ahead_waits_verified_for_a_lease_held_by_another_robot(orch, tmp_path):
    from notify import NotifySocket

    site = orch
    start_gateway(site)
    notify = NotifySocket(tmp_path / "notify.sock")
    robot = start_robot(site, env={"NOTIFY_SOCKET": notify.path})
    on_version(site, "1.0.0")
    held = lease_call(site, OTHER, {"op": "request", "version": "2.0.0"})
    assert held["state"] == "granted", held
    manifest = site.release("2.0.0")
    line = showing(site, "waiting for lease (0 ahead)")
    assert status(site)["update"] == line
    wait_until(lambda: any("STATUS=" in m and "update: waiting for lease (0 ahead)" in m for m in notify.drain()),
               TIMEOUT, "the robot's STATUS= to show the wait")
    notify.close()
    part = state(site) / "downloads" / f"{manifest['artifact']}.part"
    wait_until(lambda: "verified app 2.0.0" in robot.log(), TIMEOUT, "2.0.0 verified before the lease")
    assert part.stat().st_size == manifest["size"]
    assert current_version(app(site)) == "1.0.0"
    assert [w["robot"] for w in table(site)["queue"]] == [ROBOT]
    released = lease_call(site, OTHER, {"op": "release", "lease": held["lease"], "outcome": "committed"})
    assert released["state"] == "released", released
    on_version(site, "2.0.0")
    log = robot.log()
    assert log.count("downloading app 2.0.0") == 1 and log.count("verified app 2.0.0") == 1, log


def test_renewals_keep_the_lease_past_its_ttl_through_a_slow_self_test_and_it_is_released_at_commit(orch):
    site = orch
    start_gateway(site, LEASE_TTL_S=3)
    go = site.root / "selftest.go"
    robot = start_robot(site, SELFTEST_CMD=f"while [ ! -e {go} ]; do sleep 0.1; done",
                        PROBATION_S=60, HEALTH_CMD="true", HEALTH_INTERVAL=1)
    go.touch()
    on_version(site, "1.0.0")
    go.unlink()
    site.release("2.0.0")
    lease = wait_until(lambda: robot_state(state(site))["phase"] == "selftest" and lease_of(site, ROBOT),
                       TIMEOUT, "r1 in its self-test, holding a lease")
    # Past the TTL it was granted with, the lease still holds: the other robot must wait.
    wait_until(lambda: time.time() > lease["granted_at"] + 2 * lease["ttl_s"], TIMEOUT, "two TTLs into the self-test")
    renewed = lease_of(site, ROBOT)
    assert renewed is not None and renewed["lease"] == lease["lease"] and renewed["expires_at"] > time.time()
    assert lease_call(site, OTHER, {"op": "request", "version": "2.0.0"})["state"] == "waiting"
    go.touch()
    # Released at the commit, before probation ends: the next robot's turn does not wait for it.
    wait_until(lambda: lease_of(site, ROBOT) is None, TIMEOUT, "r1's lease released at the commit")
    assert robot_state(state(site))["phase"] == "probation"
    robot.wait_for_count(f"released lease {lease['lease']}: app 2.0.0, robot r1, committed", 1, TIMEOUT)
    assert lease_call(site, OTHER, {"op": "request", "version": "2.0.0"})["state"] == "granted"


def test_a_failed_self_test_rolls_back_and_releases_the_lease_as_rolled_back(orch):
    site = orch
    start_gateway(site)
    robot = start_robot(site)
    on_version(site, "1.0.0")
    site.release("3.0.0", selftest="exit 1")
    robot.wait_for_count("rolled back app 3.0.0", 1, TIMEOUT)
    wait_until(lambda: re.search(r"released lease \d+: app 3.0.0, robot r1, rolled_back", robot.log()), TIMEOUT,
               "the release of the lease at rollback")
    assert current_version(app(site)) == "1.0.0"
    assert lease_of(site, ROBOT) is None or lease_of(site, ROBOT)["lease"] > 2  # a later attempt's lease, not the first


def test_a_lease_held_at_a_kill_9_mid_install_is_released_after_the_restart(orch):
    site = orch
    start_gateway(site)
    robot = start_robot(site)
    on_version(site, "1.0.0")
    robot.stop()
    robot = site.robot(site.gw.url, ROBOT, env={"OTAD_TEST_CRASH_AT": "current-linked"}, TOKEN_FILE=site.token_file)
    robot.start(wait_listening=False)
    site.release("2.0.0")
    wait_until(lambda: not robot.running(), TIMEOUT, "the robot killed at current-linked")
    held = lease_of(site, ROBOT)
    assert held is not None, table(site)
    saved = json.loads((state(site) / "orchestration.json").read_text())
    assert saved["lease"]["lease"] == held["lease"]
    robot = start_robot(site)
    wait_until(lambda: f"released lease {held['lease']}: app 2.0.0, robot r1, rolled_back" in robot.log(), TIMEOUT,
               "the lease held at the kill released after recovery")
    on_version(site, "2.0.0")  # the interrupted install is not the release's fault: tried again


@pytest.mark.parametrize("status", [404, 405])
def test_leases_auto_with_an_old_gateway_installs_without_a_lease(orch, status):
    """A gateway from before Wire 5 answers POST /lease with 405 (it takes no POST but /metrics);
    a plain web server with 404. Either way a robot with LEASES=auto installs without a lease, so
    robots can be upgraded before their gateway."""
    site = orch
    server = HostileServer()
    if status == 405:
        server.post_answer = (405, b'{"error": "method not allowed"}')
    try:
        server.serve_release(site.root / f"out-1.0.0-{site.key.stem}")  # built by the fixture's release
        robot = site.robot(server.url, ROBOT, TOKEN_FILE=site.token_file).start(wait_listening=False)
        on_version(site, "1.0.0")
        server.serve_release(site.build("2.0.0"))
        on_version(site, "2.0.0")
        assert server.posts and set(server.posts) == {"/lease"}
        assert robot.log().count(f"answers {status} to POST /lease") == 1  # logged once
        assert update_line(site) == "-"
    finally:
        server.close()


def saved_update(site: Site) -> str:
    path = state(site) / "orchestration.json"
    return json.loads(path.read_text())["update"] if path.exists() else ""


def test_hostile_lease_answers_keep_the_robot_from_installing_and_running(orch):
    """tests/corpus/lease-answer-cases.json: each answer a broken or hostile gateway could give to
    POST /lease. The robot must not take any of them for a grant (nor install), must keep running,
    and must show why in its update line."""
    site = orch
    server = HostileServer()
    try:
        server.serve_release(site.root / f"out-1.0.0-{site.key.stem}")
        robot = site.robot(server.url, ROBOT, TOKEN_FILE=site.token_file)
        for case in ANSWER_CASES:
            server.post_answer = (200, (CORPUS / case["file"]).read_bytes())
            asked = len(server.posts)
            if not robot.running():
                robot.start(wait_listening=False)
            wait_until(lambda: len(server.posts) >= asked + 2 and case["expect"] in saved_update(site), TIMEOUT,
                       f"{case['id']}: the update line to show {case['expect']!r}")
            assert current_version(app(site)) is None and robot.running(), case["id"]
        server.post_answer = None  # an old gateway again: installs without a lease
        on_version(site, "1.0.0")
        assert "Traceback" not in robot.log()
    finally:
        server.close()


def test_every_lease_answer_corpus_file_has_a_row_and_every_row_a_file():
    assert {p.name for p in (CORPUS / "lease-answer").iterdir()} == {c["file"].split("/")[1] for c in ANSWER_CASES}
