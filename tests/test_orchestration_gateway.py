"""Site orchestration at the gateway (issue 16): a real otad-gateway, real HTTP, real files.

Robots are HTTP clients with their telemetry tokens asking POST /lease (Wire 5,
docs/formats.md), as otad-robot's lease client does; the robot's own side is
another test file's. The gateway's clock is put at a chosen instant with
OTAD_TEST_CLOCK_SKEW (otad.trust.clock), so a window can be closed or open, and
a lease can expire, without waiting for it.
"""
from __future__ import annotations

import calendar
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import requests

from fleet import robot_token, write_tokens
from harness import wait_until
from notify import NotifySocket
from otad.gateway.leasewire import LeaseRequest
from otad.gateway.orchestrator import OrchestrationSettings, Orchestrator
from otad.orchestration.budget import parse_groups, parse_limit
from otad.orchestration.windows import DAYS, parse_timezone, parse_windows
from test_rollout_gateway import rollsite, take_first_plan  # noqa: F401 (rollsite is a fixture)

pytestmark = pytest.mark.slow  # a daemon test: run once, in make check's first pass (as test_rollout_gateway.py)

ROBOTS = ["r1", "r2", "r3", "r4", "r5"]


class LeaseClient:
    """Robots asking a running gateway for leases with their telemetry tokens."""

    def __init__(self, gw=None) -> None:
        self.gw = gw

    def post(self, robot: str | None, body, headers: dict | None = None) -> requests.Response:
        auth = {"Authorization": f"Bearer {robot_token(robot)}"} if robot else {}
        return requests.post(f"{self.gw.url}/lease", data=body, headers={**auth, **(headers or {})}, timeout=10)

    def lease(self, robot: str, op: str, **fields) -> dict:
        reply = self.post(robot, json.dumps({"op": op, **fields}).encode())
        assert reply.status_code == 200, reply.text
        answer = reply.json()
        assert set(answer) == {"state", "reason", "lease", "ttl_s", "ahead", "retry_s"}, answer
        return answer

    def request(self, robot: str, version: str = "2.0.0") -> dict:
        return self.lease(robot, "request", version=version)

    def renew(self, robot: str, lease: int) -> dict:
        return self.lease(robot, "renew", lease=lease)

    def release(self, robot: str, lease: int, outcome: str = "committed") -> dict:
        return self.lease(robot, "release", lease=lease, outcome=outcome)


class LeaseSite(LeaseClient):
    """A gateway with ROBOT_TOKENS_FILE for ROBOTS, and its state files."""

    def __init__(self, site, root: Path, robots: list[str] = ROBOTS) -> None:
        super().__init__()
        self.site, self.root, self.robots = site, root, robots
        self.tokens = write_tokens(root, robots)

    def start(self, env: dict | None = None, **settings):
        self.gw = self.site.gateway(ROBOT_TOKENS_FILE=self.tokens["robots"], env=env, **settings).start()
        return self.gw

    def restart(self, env: dict | None = None):
        if env is not None:
            self.gw.env.update(env)
        self.gw = self.gw.start()
        return self.gw

    @property
    def leases_file(self) -> Path:
        return self.root / "gw-state" / "orchestration" / "leases.json"


@pytest.fixture
def leases(site, tmp_path):
    return LeaseSite(site, tmp_path)


def test_the_site_budget_holds_across_robots_and_waiters_are_served_in_arrival_order(leases):
    leases.start(SITE_MAX_CONCURRENT=2)
    first, second = leases.request("r1"), leases.request("r2")
    assert first["state"] == second["state"] == "granted" and first["lease"] != second["lease"]
    assert first["ttl_s"] == 300 and first["retry_s"] == 5
    waits = [leases.request(robot) for robot in ("r3", "r4", "r5")]
    assert [w["state"] for w in waits] == ["waiting"] * 3
    assert [w["ahead"] for w in waits] == [0, 1, 2]
    assert "site budget full: 2 of 2 leases in use (SITE_MAX_CONCURRENT 2)" in waits[2]["reason"]
    # Asking again keeps the place, and never a second lease for a holder.
    assert leases.request("r4")["ahead"] == 1
    assert leases.request("r1")["lease"] == first["lease"]
    # A release frees one slot, for the first in line only.
    assert leases.release("r2", second["lease"])["state"] == "released"
    assert leases.request("r4")["state"] == "waiting" and leases.request("r5")["ahead"] == 1
    granted = leases.request("r3")
    assert granted["state"] == "granted"
    log = leases.gw.wait_for_log(rf"lease: granted lease {granted['lease']} to r3 for 2\.0\.0")
    assert log
    text = leases.gw.new_log()
    assert "lease: r2 released lease 2 (2.0.0): committed after" in text
    assert text.count("lease: r4 waits for 2.0.0") == 1  # a stable reason is logged once, not every ask


def skew_to(instant: str) -> dict:
    """OTAD_TEST_CLOCK_SKEW putting the gateway's clock at `instant` (UTC, ISO 8601) from now on."""
    return {"OTAD_TEST_CLOCK_SKEW": str(calendar.timegm(time.strptime(instant, "%Y-%m-%dT%H:%M:%SZ")) - time.time())}


def test_with_one_slot_every_robot_gets_its_turn_in_arrival_order(leases):
    leases.start(SITE_MAX_CONCURRENT=1)
    arrival = ["r3", "r1", "r5", "r2", "r4"]
    for robot in arrival:
        leases.request(robot)
    served = []
    for _ in arrival:
        answers = {robot: leases.request(robot) for robot in arrival if robot not in served}
        granted = [robot for robot, answer in answers.items() if answer["state"] == "granted"]
        assert len(granted) == 1, answers  # never two at once
        assert sorted(a["ahead"] for a in answers.values() if a["state"] == "waiting") == list(range(len(answers) - 1))
        served.append(granted[0])
        assert leases.release(granted[0], answers[granted[0]]["lease"])["state"] == "released"
    assert served == arrival


def test_status_shows_leases_in_use_the_budget_and_the_queue(leases, tmp_path):
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        leases.start(env={"NOTIFY_SOCKET": notify.path}, SITE_MAX_CONCURRENT=1)
        wait_until(lambda: any("STATUS=" in m and "leases 0/1 in use, 0 waiting" in m for m in notify.drain()), 10,
                   "a STATUS line with no lease in use")
        leases.request("r1"), leases.request("r2"), leases.request("r3")
        wait_until(lambda: any("leases 1/1 in use, 2 waiting" in m for m in notify.drain()), 10,
                   "a STATUS line with one lease in use and two robots waiting")
    finally:
        notify.close()


def test_an_expired_lease_is_logged_frees_its_slot_and_its_robot_goes_to_the_back(leases):
    leases.start(SITE_MAX_CONCURRENT=1, LEASE_TTL_S=3)
    dead = leases.request("r1")  # r1 dies mid-install: it never renews
    assert dead["state"] == "granted" and dead["ttl_s"] == 3
    assert leases.request("r2")["ahead"] == 0 and leases.request("r3")["ahead"] == 1
    # Swept by the gateway itself, with no robot asking: the expiry is logged and the slot passed on.
    leases.gw.wait_for_log(rf"lease: lease {dead['lease']} of r1 expired \(not renewed within 3s\); r1 goes to the back of the queue")
    leases.gw.wait_for_log(r"lease: granted lease 2 to r2 for 2\.0\.0")
    assert leases.request("r2")["lease"] == 2
    back = leases.request("r1")
    assert back["state"] == "waiting" and back["ahead"] == 1  # behind r3, who waited longer
    assert leases.renew("r1", dead["lease"])["state"] == "refused"


def test_a_gateway_killed_with_leases_held_restarts_with_the_same_leases_and_no_double_grant(leases):
    leases.start(SITE_MAX_CONCURRENT=2)
    held = {robot: leases.request(robot)["lease"] for robot in ("r1", "r2")}
    assert leases.request("r3")["state"] == "waiting" and leases.request("r4")["ahead"] == 1
    leases.gw.kill9()
    # Down for an hour: the leases' TTL passed on the clock, but the robots could not renew.
    leases.restart(env=skew_to(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))))
    leases.gw.wait_for_log(r"lease: kept 2 lease\(s\) \(r1 1, r2 2\) and 2 waiter\(s\)")
    assert leases.request("r5") == {**leases.request("r5"), "state": "waiting", "ahead": 2}
    assert leases.request("r3")["state"] == "waiting"  # the budget is still full
    for robot, lease in held.items():
        renewed = leases.renew(robot, lease)
        assert renewed["state"] == "granted" and renewed["lease"] == lease
    assert leases.request("r1")["lease"] == held["r1"]  # asking again is the same lease
    assert leases.release("r1", held["r1"], "withdrawn")["state"] == "released"
    third = leases.request("r3")
    assert third["state"] == "granted" and third["lease"] not in held.values()
    assert leases.release("r1", held["r1"], "withdrawn")["state"] == "released"  # a retried release is fine
    assert json.loads(leases.leases_file.read_text())["next_lease"] == 4


@pytest.mark.parametrize("start, later, spec, first, then", [
    # Wednesday noon in Berlin; then 22:05; then five minutes before it closes, too late for a 600 s install.
    ("2026-12-02T11:00:00Z", "2026-12-02T21:05:00Z", "Mon-Fri 22:00-05:00", "outside window until 22:00", "granted"),
    ("2026-12-03T03:55:00Z", "2026-12-03T03:55:00Z", "Mon-Fri 22:00-05:00",
     "window closes at 05:00, before an install of about 600s would end", "waiting"),
    # Clocks go forward (2027-03-28 02:00 CET -> 03:00 CEST): a window opening at 02:00 opens at the jump.
    ("2027-03-28T00:59:00Z", "2027-03-28T01:00:30Z", "Sun 02:00-05:00", "outside window until 03:00", "granted"),
    # Clocks go back (2027-10-31 03:00 CEST -> 02:00 CET): closed at 02:30 CEST, not open again at 02:15 CET.
    ("2027-10-31T00:45:00Z", "2027-10-31T01:15:00Z", "Sun 00:00-02:30", "outside window (opens 2027-11-07 00:00)", "waiting"),
], ids=["weekday", "too-late-to-fit", "dst-forward", "dst-back"])
def test_leases_are_granted_only_inside_the_window_in_site_time(leases, start, later, spec, first, then):
    leases.start(env=skew_to(start), SITE_MAX_CONCURRENT=2, MAINTENANCE_WINDOWS=spec, SITE_TIMEZONE="Europe/Berlin")
    answer = leases.request("r1")
    assert answer["state"] == "waiting" and answer["reason"] == first and answer["ahead"] == 0
    leases.gw.wait_for_log(rf"lease: r1 waits for 2\.0\.0: {re.escape(first)}")
    leases.gw.stop()
    leases.restart(env=skew_to(later))
    assert leases.request("r1")["state"] == then


def test_a_plans_budget_and_windows_replace_the_gateways_for_its_version(rollsite):
    closed = f"{DAYS[(time.gmtime().tm_wday + 3) % 7]} 10:00-11:00"  # three days away: closed now
    take_first_plan(rollsite, gateway={"SITE_MAX_CONCURRENT": 3, "MAINTENANCE_WINDOWS": closed, "SITE_TIMEZONE": "UTC"},
                    site_max_concurrent="1", windows="Mon-Sun 00:00-24:00")
    leases = LeaseClient(rollsite.gw)
    assert leases.request("r1", "2.0.0")["state"] == "granted"
    waiting = leases.request("r2", "2.0.0")
    assert waiting["state"] == "waiting" and "site budget full: 1 of 1 leases in use (the plan's 1)" in waiting["reason"]
    # Another version is not this plan's: the gateway's window (closed) and budget apply to it.
    other = leases.request("r3", "3.0.0")
    assert other["state"] == "waiting" and other["reason"] == f"outside window (opens {closed.split('-')[0]})"


def test_a_group_never_drops_below_min_available_and_a_full_group_does_not_stall_the_site(leases):
    leases.start(SITE_MAX_CONCURRENT=4, ROBOT_GROUPS="zoneA=r1,r2,r3 min_available=2; zoneB=r4,r5 max=1")
    assert leases.request("r1")["state"] == "granted"
    blocked = leases.request("r2")
    assert blocked["state"] == "waiting" and blocked["ahead"] == 0
    assert "group zoneA would have 1 robots working, fewer than min_available 2" in blocked["reason"]
    assert leases.request("r3")["state"] == "waiting"
    first_b = leases.request("r4")
    assert first_b["state"] == "granted"  # passed r2 and r3, whose zone is at its minimum
    second_b = leases.request("r5")
    assert second_b["state"] == "waiting" and "group zoneB budget full: 1 of 1 leases in use (max 1)" in second_b["reason"]
    assert leases.release("r1", 1, "rolled_back")["state"] == "released"
    assert leases.request("r2")["state"] == "granted" and leases.request("r3")["state"] == "waiting"


def test_a_lease_table_that_cannot_be_saved_gets_503_and_no_answer_before_it_is_on_disk(leases):
    leases.start(SITE_MAX_CONCURRENT=1)
    assert leases.request("r1")["state"] == "granted"
    folder = leases.leases_file.parent
    shutil.rmtree(folder)
    folder.write_text("not a folder")  # every write below it fails
    reply = leases.post("r2", b'{"op": "request", "version": "2.0.0"}')
    assert reply.status_code == 503 and reply.headers["Retry-After"] == "5", reply.text
    assert reply.json() == {"error": "lease table could not be saved, retry later"}
    leases.gw.wait_for_log(r"lease: cannot write .*/orchestration/\w+\.json: .*; answering 503 until it can be written")
    folder.unlink()
    assert leases.request("r2")["ahead"] == 0
    table = json.loads(leases.leases_file.read_text())
    assert [l["robot"] for l in table["leases"]] == ["r1"] and [w["robot"] for w in table["queue"]] == ["r2"]


@pytest.mark.parametrize("name, data, reason", [
    ("leases.json", b'{"schema": 1, "next_seq": 1, "next_lease": 1, "leases": [], "queue": [', "lease table is not valid JSON"),
    ("leases.json", b'{"schema": 1, "next_seq": 3, "next_lease": 3, "queue": [], "leases": ['
                    b'{"robot": "r1", "lease": 1, "phase": 0, "granted_at": 1, "expires_at": 9, "ttl_s": 300},'
                    b'{"robot": "r1", "lease": 2, "phase": 0, "granted_at": 1, "expires_at": 9, "ttl_s": 300}]}',
     "lease table grants robot 'r1' two leases"),
    ("installs.json", b'{"schema": 1, "durations": [NaN], "versions": {}}', "installs file holds NaN"),
], ids=["leases-torn", "leases-two-for-one-robot", "installs-nan"])
def test_a_corrupt_orchestration_file_stops_the_gateway_from_starting_with_one_line_naming_it(leases, name, data, reason):
    leases.start()
    assert leases.request("r1")["state"] == "granted"
    leases.gw.stop()
    broken = leases.leases_file.parent / name
    broken.write_bytes(data)
    leases.gw.start(wait_listening=False)
    assert leases.gw.proc.wait(20) != 0
    lines = [l for l in leases.gw.new_log().splitlines() if name in l]
    assert len(lines) == 1 and str(broken) in lines[0] and reason in lines[0], lines
    assert "listening on" not in leases.gw.new_log()


CORPUS = Path(__file__).parent / "corpus"
CASES = json.loads((CORPUS / "lease-request-cases.json").read_text())


def test_hostile_lease_bodies_each_get_a_one_line_4xx_and_the_gateway_keeps_serving(leases):
    leases.start(SITE_MAX_CONCURRENT=1)
    for case in CASES:
        reply = leases.post("r1", (CORPUS / case["file"]).read_bytes())
        assert reply.status_code == case.get("status", 400), (case["id"], reply.text)
        error = reply.json()["error"]
        assert case["expect"] in error and "\n" not in error and len(error) < 300, (case["id"], error)
    assert leases.request("r1")["state"] == "granted"  # none of them took or changed a lease
    assert json.loads(leases.leases_file.read_text())["next_lease"] == 2
    body = b'{"op": "request", "version": "2.0.0"}'
    assert leases.post(None, body).status_code == 401
    assert leases.post("r1", body, {"Authorization": "Bearer not-a-robot-token-at-all"}).status_code == 401
    assert leases.post("r1", iter([body])).status_code == 411  # chunked: no Content-Length
    assert leases.post("r1", b" " * 4097).status_code == 413
    assert leases.request("r2")["state"] == "waiting"


def test_without_robot_tokens_lease_requests_are_refused_401(site):
    gw = site.gateway().start()
    reply = requests.post(f"{gw.url}/lease", data=b'{"op": "request", "version": "2.0.0"}',
                          headers={"Authorization": f"Bearer {robot_token('r1')}"}, timeout=10)
    assert reply.status_code == 401 and reply.json()["error"] == "missing or wrong bearer token"


def test_every_lease_request_corpus_file_has_a_row_and_every_row_a_file():
    files = {p.relative_to(CORPUS).as_posix() for p in (CORPUS / "lease-request").iterdir()}
    assert files == {case["file"] for case in CASES}
    assert len({case["id"] for case in CASES}) == len(CASES)


def test_a_deferred_robot_leaves_the_queue_and_is_logged_once_per_reason(leases):
    leases.start(SITE_MAX_CONCURRENT=1)
    assert leases.request("r1")["state"] == "granted"
    assert leases.request("r2")["ahead"] == 0 and leases.request("r3")["ahead"] == 1
    for _ in range(3):
        deferred = leases.lease("r2", "defer", reason="deferred by READY_CMD: retry-after=600", too_long=False)
        assert deferred["state"] == "deferred" and deferred["reason"] == "deferred by READY_CMD: retry-after=600"
    assert leases.request("r3")["ahead"] == 0  # r2 is no longer in line
    log = leases.gw.wait_for_count("lease: r2 deferred: deferred by READY_CMD: retry-after=600")
    assert log.count("lease: r2 deferred") == 1
    assert leases.request("r2")["ahead"] == 1  # ready again: at the back


def test_a_robot_that_defers_while_granted_a_lease_unseen_frees_the_slot_at_once(leases):
    """r2 waits; r1's release grants r2 the slot during r1's call, before r2 asks again. r2's
    READY_CMD then answers 75 and it defers: it is not installing and never learnt of the lease,
    so the slot goes to r3 now, not after the lease's TTL (300 s)."""
    leases.start(SITE_MAX_CONCURRENT=1)
    first = leases.request("r1")["lease"]
    assert leases.request("r2")["state"] == "waiting" and leases.request("r3")["ahead"] == 1
    assert leases.release("r1", first)["state"] == "released"  # r2 is granted the slot here, unseen
    leases.lease("r2", "defer", reason="deferred by READY_CMD: retry-after=600", too_long=False)
    assert leases.request("r3")["state"] == "granted"
    leases.gw.wait_for_count("lease: r2 deferred while holding lease")


def test_the_site_view_snapshot_has_exactly_the_contracts_fields(tmp_path):
    """The snapshot reaches the dashboard from the gateway's sync thread (another change), not
    over an edge route, so this drives the real Orchestrator the gateway runs, in process."""
    at = calendar.timegm((2026, 12, 2, 21, 30, 0))  # Wednesday 22:30 in Berlin: inside the window
    settings = OrchestrationSettings("gw", parse_limit("2"), parse_groups(""), parse_windows("Mon-Fri 22:00-05:00"),
                                     parse_timezone("Europe/Berlin"), 300, 5, 600)
    orch = Orchestrator(tmp_path, settings, lambda: [], at)
    orch.site_robots = 5
    ask = lambda robot, op, when, **fields: orch.handle(robot, LeaseRequest(op, **fields), when)  # noqa: E731
    for n, took in enumerate((30, 50, 40)):  # three committed installs: the estimate is their median
        lease = ask("r1", "request", at, version="1.9.0")["lease"]
        assert ask("r1", "release", at + took, lease=lease, outcome="committed")["state"] == "released"
    assert [ask(r, "request", at + 60, version="2.0.0")["state"] for r in ("r1", "r2", "r3")] == ["granted", "granted", "waiting"]
    ask("r4", "defer", at + 61, reason="inhibited by /run/app/busy", too_long=True)
    assert orch.snapshot(at + 62) == {
        "site": "gw", "at": at + 62, "timezone": "Europe/Berlin",
        "budget": {"limit": "2", "source": "SITE_MAX_CONCURRENT", "slots": 2, "in_use": 2},
        "window": {"spec": "Mon-Fri 22:00-05:00", "open": True, "reason": "open until Thu 05:00"},
        "updating": [{"robot": "r1", "lease": 4, "version": "2.0.0", "since": at + 60, "expires_at": at + 360},
                     {"robot": "r2", "lease": 5, "version": "2.0.0", "since": at + 60, "expires_at": at + 360}],
        "waiting": [{"robot": "r3", "ahead": 0, "version": "2.0.0", "since": at + 60,
                     "reason": "site budget full: 2 of 2 leases in use (SITE_MAX_CONCURRENT 2)"}],
        "deferred": [{"robot": "r4", "since": at + 61, "reason": "inhibited by /run/app/busy", "too_long": True}],
        "install_estimate_s": 40.0,
    }
    assert orch.status(at + 62) == "leases 2/2 in use, 1 waiting, 1 deferred"
    assert orch.status(at + 7 * 3600) == "leases 2/2 in use, 1 waiting, 1 deferred, window closed until 22:00"
