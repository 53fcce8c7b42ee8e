"""Site orchestration (issue 16's "Must hold"): one site of six robots, the WAN down for every rollout.

Every daemon is the real one, in its own network namespace (tests/orchestration_site.py):
otad-dashboard, one otad-gateway, six otad-robots with tokens and LEASES=yes. The dashboard
is reachable only while `seed` puts a release into the gateway's cache; then the gateway's
WAN link is cut and stays down for the whole rollout, so the budget, the queue, the windows
and the readiness gates are decided at the site alone. The robots' apps are scripts whose
files show what a user would notice: the app down (ROBOT.down), its readiness (ROBOT.ready),
a mission in progress (ROBOT.inhibit); a hold file keeps a robot mid-install. The
`OutOfService` sampler checks every 50 ms, through each rollout, who is out of service.

The tests share one topology (module scope: building it and starting nine daemons is most
of the cost on a small machine); each begins from every robot idle on the last release and
rolls out the next one.
"""
from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from conftest import make_keypair
from harness import wait_until
from orchestration_site import ROBOTS, OrchestrationSite, OutOfService
from otad.robot.orchestrate import load_state
from topology import cleanup_stale, skip_reason

pytestmark = [pytest.mark.slow, pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]
GRANT = r"^lease: granted lease (\d+) to (\S+) for {version} "
BERLIN = ZoneInfo("Europe/Berlin")


@pytest.fixture(scope="module")
def orch(tmp_path_factory):
    cleanup_stale()
    root = tmp_path_factory.mktemp("orchestration-site")
    site = OrchestrationSite(root, *make_keypair(root / "keys")).build()
    try:
        site.start()
        version = site.begin()  # no limit: the first release goes everywhere at once
        site.seed(version)
        site.wait_settled(ROBOTS, version)
        yield site
    finally:
        assert site.teardown() == []


def grants(site: OrchestrationSite, version: str) -> list[tuple[int, str]]:
    """(lease id, robot) of every lease the gateway's journal says it granted for `version`, in order."""
    return [(int(m[1]), m[2]) for m in site.journal(GRANT.format(version=re.escape(version)))]


def local(text: str) -> float:
    """A Berlin wall-clock time as a unix time (the first occurrence, fold=0, in the repeated hour)."""
    return datetime.fromisoformat(text).replace(tzinfo=BERLIN).timestamp()


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def waiting(site: OrchestrationSite, robot: str, pattern: str, timeout: float = 30) -> str:
    """The robot's update status (otadctl status's `update:` line, from STATE_DIR/orchestration.json) once it matches."""
    def status() -> str:
        return load_state(site.state_dir(robot))["update"] or ""
    try:
        return wait_until(lambda: re.search(pattern, line := status()) and line, timeout,
                          f"{robot}'s update status to match {pattern!r}", interval=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc} (it is {status()!r})") from None


def test_at_most_two_robots_out_of_service_through_a_kill9_of_the_gateway(orch):
    """SITE_MAX_CONCURRENT=2 over a rollout to all six: never more than two robots out of service
    at any sample, and exactly two at times (the budget is used). Midway, with two robots holding
    leases mid-install (apps down, held) and four waiting, the gateway is killed with -9 and
    restarted: it comes back with the same two leases, the two robots go on under them (their
    release names the same lease id; no second grant to them), and the budget still holds."""
    site = orch
    version = site.begin(SITE_MAX_CONCURRENT=2, LEASE_TTL_S=6)
    site.hold(*ROBOTS)
    sampler = OutOfService(site, limit=2).start()
    site.seed(version)
    holders = wait_until(lambda: len(h := [r for r in ROBOTS if site.app_down(r)]) == 2 and h, 60,
                         "two robots to take the two leases and stop their apps")
    others = [r for r in ROBOTS if r not in holders]
    for robot in others:
        waiting(site, robot, r"^waiting for lease \(\d ahead\)$")
    held = {lease["robot"]: lease["lease"] for lease in site.leases()}
    assert set(held) == set(holders), f"leases on disk {held}, apps down {holders}"
    site.wait_status(r"leases 2/2 in use, 4 waiting")

    site.restart("gw")  # kill -9 and start again, WAN still down
    site.daemons["gw"].wait_for_log(r"lease: kept 2 lease\(s\)")
    assert {lease["robot"]: lease["lease"] for lease in site.leases()} == held
    # Both holders renew their leases with the restarted gateway (every ttl/3 = 2 s) before they finish.
    renewed_after = time.time() + 6
    wait_until(lambda: all(lease["expires_at"] > renewed_after for lease in site.leases()) and len(site.leases()) == 2,
               30, "both holders to renew their leases with the restarted gateway")
    site.unhold()
    site.wait_settled(ROBOTS, version)
    assert sampler.stop() == [], sampler.violations[:5]
    assert sampler.most == 2, f"at most {sampler.most} robot(s) were ever out of service at once: the test proved nothing"
    granted = grants(site, version)
    assert sorted(r for _, r in granted) == sorted(ROBOTS), f"one grant per robot, no second one: {granted}"
    for robot, lease in held.items():
        assert re.search(rf"^lease: {robot} released lease {lease} \({re.escape(version)}\): committed", site.log("gw"), re.M), \
            f"{robot} did not release its lease {lease} as committed"
    assert "refused" not in "".join(site.log(r) for r in holders), "a holder was refused after the gateway's restart"


def test_groups_never_drop_below_min_available(orch):
    """ROBOT_GROUPS with min_available, no site limit: zone-a (r1-r3) keeps at least 2 working,
    zone-b (r4-r6) at least 1, at every sample through a rollout to all six."""
    site = orch
    version = site.begin(ROBOT_GROUPS="zone-a=r1,r2,r3 min_available=2; zone-b=r4,r5,r6 min_available=1")
    sampler = OutOfService(site, groups={"zone-a": ({"r1", "r2", "r3"}, 2), "zone-b": ({"r4", "r5", "r6"}, 1)}).start()
    site.seed(version)
    site.wait_settled(ROBOTS, version)
    assert sampler.stop() == [], sampler.violations[:5]
    assert sampler.most >= 2, f"at most {sampler.most} robot(s) out at once: the groups were never tested together"
    waits = site.journal(rf"^lease: (r\d) waits for {re.escape(version)}: group (zone-\w) would have")
    assert waits, "no robot ever waited for its group's min_available"


def test_readiness_inhibit_fairness_and_the_lease_of_a_dead_robot(orch):
    """One slot, a lease TTL of 6 s. Every robot's READY_CMD first answers 75 (retry-after=3),
    r3's instead is inhibited (INHIBIT_FILE present): all six stay on their release, each shown
    deferred or inhibited by `otadctl status` and the gateway's journal. Then the test makes them
    ready one by one, in an order of its own, r3 last by removing its inhibit file; each joins the
    queue behind the ones before it (`N ahead`). r4, made ready first, takes the lease within one
    retry interval and is held mid-install; it is killed with -9 there. Its lease expires after its
    TTL (journal), only then does the next robot get it, and every robot is served in the order it
    asked. r4, started again, goes to the back of the queue and updates last."""
    site = orch
    version = site.begin(SITE_MAX_CONCURRENT=1, LEASE_TTL_S=6)
    before = site.current("r1")
    order = ["r4", "r2", "r6", "r1", "r5", "r3"]
    for robot in ROBOTS:
        site.set_ready(robot, "75 retry-after=3")
    site.set_ready("r3", "0")
    site.inhibit_file("r3").touch()
    site.hold(*ROBOTS)
    sampler = OutOfService(site, limit=1).start()
    site.seed(version)
    for robot in ROBOTS:
        expected = rf"^inhibited by {re.escape(str(site.inhibit_file(robot)))}" if robot == "r3" else \
            r"^deferred by READY_CMD: retry-after=3"
        waiting(site, robot, expected)
        assert re.search(expected, site.update_line(robot)), f"otadctl status on {robot}"
        assert site.journal(rf"^lease: {robot} deferred: {expected.lstrip('^')}"), f"no deferral of {robot} in the journal"
    assert all(site.current(r) == before for r in ROBOTS)
    site.wait_status(r"leases 0/1 in use, 0 waiting, 6 deferred")

    made_ready = time.monotonic()
    site.set_ready("r4", "0")
    wait_until(lambda: site.app_down("r4"), 3 + 3, "r4 to take the lease and stop its app within one retry interval (3 s)")
    assert time.monotonic() - made_ready <= 3 + 3
    for ahead, robot in enumerate(order[1:]):
        if robot == "r3":
            assert site.current("r3") == before and not site.out_of_service("r3"), "r3 updated while inhibited"
            site.inhibit_file("r3").unlink()
        else:
            site.set_ready(robot, "0")
        waiting(site, robot, rf"^waiting for lease \({ahead} ahead\)$")

    site.daemons["r4"].kill9()  # holding lease 1 of this rollout, its app down mid-install
    sampler.dead.add("r4")
    site.unhold()
    lease = grants(site, version)[0][0]
    site.daemons["gw"].wait_for_log(rf"lease: lease {lease} of r4 expired \(not renewed within 6s\)", 30)
    site.wait_settled(order[1:], version, timeout=90)
    r4_lease = next(l for l in sampler.seen_leases.values() if l["lease"] == lease)
    r2_lease = next(l for l in sampler.seen_leases.values() if l["robot"] == "r2")
    assert r2_lease["granted_at"] >= r4_lease["expires_at"], "r2 had a lease before r4's expired"

    sampler.dead.discard("r4")
    site.start_daemon("r4")
    site.wait_settled(["r4"], version)
    assert sampler.stop() == [], sampler.violations[:5]
    served = [robot for _, robot in grants(site, version)]
    assert served[:6] == order and set(served[6:]) <= {"r4"}, f"served in the order {served}, asked in {order}"
    assert sampler.order == order, f"out of service in the order {sampler.order}, asked in {order}"


def test_a_robot_that_stays_dead_is_not_granted_its_lease_again_and_again(orch):
    """One slot, a lease TTL of 3 s. r1 takes the lease, is killed with -9 mid-install and stays
    down. Its lease expires and the others update. The gateway last heard from r1 before it died,
    so r1 must not be granted the site's only slot again and again (each grant blocks it for a
    TTL); it leaves the queue once not heard from for max(60, 6 x LEASE_RETRY_S) = 60 s."""
    site = orch
    version = site.begin(SITE_MAX_CONCURRENT=1, LEASE_TTL_S=3)
    others = ROBOTS[1:]
    for robot in others:
        site.set_ready(robot, "75 retry-after=2")  # r1 first
    site.hold("r1")
    sampler = OutOfService(site, limit=1).start()
    try:
        site.seed(version)
        wait_until(lambda: site.app_down("r1"), 30, "r1 to take the lease and stop its app")
        site.daemons["r1"].kill9()
        sampler.dead.add("r1")
        site.unhold()
        for robot in others:
            site.set_ready(robot, "0")
        site.wait_settled(others, version)
        left = r"^lease: r1 left the queue: not heard from"

        def again() -> list[int]:
            return [lease for lease, robot in grants(site, version) if robot == "r1"][1:]
        wait_until(lambda: site.journal(left) or len(again()) >= 3, 120,
                   "r1 to leave the queue, or to be granted the slot three more times")
        assert again() == [], f"r1, dead since its first lease, was granted leases {again()} as well"
    finally:
        sampler.dead.discard("r1")
        site.start_daemon("r1")
        site.wait_settled(ROBOTS, version)
    assert sampler.stop() == [], sampler.violations[:5]


def test_windows_across_both_dst_changes(orch):
    """The gateway runs on the test clock (OTAD_TEST_CLOCK_SKEW), SITE_TIMEZONE Europe/Berlin.

    Autumn, one slot: `Sat 22:00-02:30` on the night of 2026-10-25, when 03:00 CEST becomes 02:00
    CET; the close falls in the repeated hour, so it is the first 02:30 (00:30 UTC), not the
    second (01:30 UTC). The clock starts 30 s before it: r1 gets the lease (and is held), the
    others wait; once the window closes they are told `outside window`, and no lease is granted
    after 00:30 UTC. Spring, no limit: `Sun 03:00-05:00` on 2027-03-28, when 02:00 CET becomes
    03:00 CEST: the window opens at the jump (01:00 UTC), not an hour later. The clock starts 15 s
    before it; the robots show `outside window until 03:00` and proceed once it opens. Every lease
    of both nights is granted inside its window (the gateway's persisted grant times; every grant
    of the journal among them), and no robot stopped its app outside its window (the sampler's
    times, on the gateway's clock)."""
    site = orch
    autumn = (local("2026-10-24T22:00"), local("2026-10-25T02:30"))
    spring = (local("2027-03-28T03:00"), local("2027-03-28T05:00"))
    # The instants in UTC, worked out by hand: zoneinfo's first occurrence, and the jump.
    assert (autumn[1], spring[0]) == (utc("2026-10-25T00:30"), utc("2027-03-28T01:00"))
    sampler = OutOfService(site, limit=1)
    sampler.skew = autumn[1] - 30 - time.time()
    version = site.begin({"OTAD_TEST_CLOCK_SKEW": f"{sampler.skew:.3f}"}, SITE_MAX_CONCURRENT=1,
                         MAINTENANCE_WINDOWS="Sat 22:00-02:30", INSTALL_ESTIMATE_S=5)
    site.hold("r1")
    for robot in ROBOTS[1:]:
        site.set_ready(robot, "75 retry-after=2")  # r1 first, then the others queue behind it
    sampler.start()
    site.seed(version)
    wait_until(lambda: site.app_down("r1"), 30, "r1 to take the lease inside the autumn window")
    for robot in ROBOTS[1:]:
        site.set_ready(robot, "0")
    for robot in ROBOTS[1:]:
        waiting(site, robot, r"^outside window", timeout=60)  # at 02:30 CEST, half an hour before the clocks go back
    site.wait_status(r"leases 1/1 in use, 5 waiting, window closed")
    site.unhold()
    site.wait_settled(["r1"], version)
    assert all(site.current(r) != version for r in ROBOTS[1:]), "a robot updated after the autumn window closed"

    skew = spring[0] - 15 - time.time()
    site.configure_gateway({"OTAD_TEST_CLOCK_SKEW": f"{skew:.3f}"}, MAINTENANCE_WINDOWS="Sun 03:00-05:00")
    sampler.skew, sampler.limit = skew, None  # spring: no SITE_MAX_CONCURRENT, only the window
    for robot in ROBOTS[1:]:
        waiting(site, robot, r"^outside window until 03:00$")
    site.wait_status(r"window closed until 03:00")
    site.wait_settled(ROBOTS, version, timeout=90)
    assert sampler.stop() == [], sampler.violations[:5]
    assert autumn[0] <= sampler.first_out["r1"] < autumn[1]
    for robot in ROBOTS[1:]:
        assert spring[0] <= sampler.first_out[robot] < spring[1], \
            f"{robot} stopped its app at {sampler.first_out[robot]:.0f} on the gateway's clock, outside {spring}"
    leases = sampler.seen_leases
    assert {lease for lease, _ in grants(site, version)} <= set(leases), "a granted lease the sampler never saw"
    for lease in leases.values():
        night = autumn if lease["robot"] == "r1" else spring
        assert night[0] <= lease["granted_at"] < night[1], f"lease {lease} granted outside its window {night}"
