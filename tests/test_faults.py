"""The seed's failure tables, one test per row, on a real two-network site (tests/topology.py).

A dashboard on wan_net, a gateway on wan_net and edge_net, three robots on
edge_net, each running otad-robot and telemetry-agent: every daemon a real
process in its own network namespace, started from the shipped configs. One
site serves the whole module (building it costs seconds); every test starts
from a healthy site (all links up, all daemons running, every robot idle on
the newest good release) and publishes its own, higher, versions, so the tests
do not depend on their order. A sampler thread checks every robot's CURRENT
every 50 ms for the whole module: "devices never enter broken states" is
checked throughout, not only at the end of each test.
"""
from __future__ import annotations

import json
import re

import pytest

from conftest import otad_release
from harness import wait_until
from topology import CurrentSampler, Topology, cleanup_stale, flip_byte, our_namespaces, seqs_by_robot, skip_reason, wait_settled

pytestmark = [pytest.mark.slow, pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))]
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def topo(tmp_path_factory):
    cleanup_stale()
    root = tmp_path_factory.mktemp("faults")
    keys = {}
    for name in ("release", "stranger"):
        assert otad_release("keygen", "--output-prefix", str(root / name)).returncode == 0
        keys[name] = (root / f"{name}.key", root / f"{name}.pub")
    site = Topology(root, *keys["release"])
    site.stranger_key = keys["stranger"][0]
    site.sampler = CurrentSampler(site)
    site.minor = 0
    try:
        site.build().start()
        site.good = publish_good(site, "1.0.0")
        wait_settled(site, "1.0.0")
        site.sampler.start()
        yield site
    finally:
        site.sampler.stop()
        left = site.teardown()
    assert left == [], f"left behind: {left}"
    assert not [n for n in our_namespaces() if n.startswith(site.tag)]
    assert site.sampler.problems == [], site.sampler.problems[:10]


@pytest.fixture(autouse=True)
def healthy(topo):
    heal(topo)
    yield
    assert topo.sampler.problems == [], topo.sampler.problems[:10]


def heal(topo) -> None:
    """All links up, no rate limits, every daemon running, every robot idle on the newest good release."""
    for robot in topo.robot_names:
        topo.rate_limit(robot, None)
        topo.restore_edge(robot)
    topo.rate_limit("gateway", None)
    topo.restore_wan()
    for name in topo.daemons:
        topo.start_daemon(name)
    wait_settled(topo, topo.good, timeout=60)


def next_version(topo) -> str:
    topo.minor += 1
    return f"1.{topo.minor}.0"


def publish_good(topo, version: str, **build) -> str:
    manifest = topo.release(version, **build)
    topo.sampler.verified.add(manifest["sha256"])
    return version


class Logs:
    """What each daemon logged from now on."""

    def __init__(self, topo) -> None:
        self.topo = topo
        self.offsets = {name: len(topo.log(name)) for name in topo.daemons}

    def new(self, name: str) -> str:
        return self.topo.log(name)[self.offsets[name]:]

    def wait(self, name: str, pattern: str, timeout: float = 30) -> re.Match:
        return wait_until(lambda: re.search(pattern, self.new(name)), timeout, f"{name} to log {pattern!r}", interval=0.1)


def events_at_dashboard(topo) -> set[tuple[str, str, str]]:
    return {(r[0], json.loads(r[4])["event"], json.loads(r[4])["version"]) for r in topo.dashboard_rows() if r[3] == "event"}


def assert_telemetry_complete(topo, timeout: float = 40) -> None:
    """Every record the agents created so far reaches the dashboard: once each, in seq order, none missing."""
    created = {r: topo.agent_issued(r) for r in topo.robot_names}
    wait_until(lambda: all(len(seqs_by_robot(topo.dashboard_rows()).get(r, [])) >= n for r, n in created.items()),
               timeout, f"{created} records at the dashboard", interval=0.2)
    held = seqs_by_robot(topo.dashboard_rows())
    for robot in topo.robot_names:
        seqs = held[robot]
        # At least as many as were made, each once, in order: none missing.
        assert all(a < b for a, b in zip(seqs, seqs[1:])), f"{robot}: duplicated or reordered records near " \
            f"{[b for a, b in zip(seqs, seqs[1:]) if a >= b][:5]}"
    assert not [r for r in topo.dashboard_rows() if r[3] == "gap"], "the gateway dropped metrics"


# -- telemetry pipeline ------------------------------------------------------------------

def test_wan_outage_buffers_locally(topo):
    logs = Logs(topo)
    topo.cut_wan()
    logs.wait("gateway", r"telemetry: forwarding failed, buffering")
    held_at_cut = len(topo.dashboard_rows())
    wait_until(lambda: topo.gateway_backlog() >= 15, 30, "15 records buffered at the gateway", interval=0.2)
    assert len(topo.dashboard_rows()) == held_at_cut, "records reached the dashboard through a cut WAN"
    # The site itself carries on: robots still reach their gateway.
    assert "gateway unreachable" not in "".join(logs.new(r) for r in topo.robot_names)
    assert all(len(topo.agent_pending(r)) < 5 for r in topo.robot_names), "the gateway stopped acknowledging records"
    backlog = topo.gateway_backlog()
    topo.restore_wan()
    logs.wait("gateway", r"telemetry: dashboard reachable again after \d+s; flushing the backlog")
    assert_telemetry_complete(topo)
    status = topo.status_json()
    assert {r["robot_id"] for r in status["robots"]} == set(topo.robot_names)
    assert all(r["version"] == topo.good for r in status["robots"])
    assert backlog >= 15


def test_dashboard_down_is_retried(topo):
    logs = Logs(topo)
    topo.stop_dashboard()
    logs.wait("gateway", r"telemetry: forwarding failed, buffering")
    # A release published while the dashboard is down is picked up once it is back.
    version = publish_good(topo, next_version(topo))
    wait_until(lambda: topo.gateway_backlog() >= 9, 30, "records buffered while the dashboard is down", interval=0.2)
    assert all(topo.current(r) != version for r in topo.robot_names)
    topo.start_dashboard()
    logs.wait("gateway", r"dashboard reachable again after \d+s")
    logs.wait("gateway", r"telemetry: dashboard reachable again")
    wait_settled(topo, version)
    topo.good = version
    assert_telemetry_complete(topo)
    wait_until(lambda: {(r, "installed", version) for r in topo.robot_names} <= events_at_dashboard(topo), 30,
               "every robot's installed event at the dashboard")


def test_gateway_restart_resumes_from_db(topo):
    logs = Logs(topo)
    topo.cut_wan()
    wait_until(lambda: topo.gateway_backlog() >= 15, 30, "records buffered at the gateway", interval=0.2)
    topo.kill9("gateway")
    buffered = topo.gateway_backlog()
    assert buffered >= 15, "acknowledged records are not on the gateway's disk after kill -9"
    topo.start_daemon("gateway")
    # Back up with the WAN still down: it serves its cache and keeps buffering.
    code, body = topo.http_get("r1", "http://10.231.2.1:8081/manifest")
    assert code == 200 and json.loads(body)["version"] == topo.good
    wait_until(lambda: topo.gateway_backlog() > buffered, 20, "new records buffered after the restart", interval=0.2)
    topo.restore_wan()
    logs.wait("gateway", r"telemetry: dashboard reachable again")
    assert_telemetry_complete(topo)


# -- OTA pipeline ------------------------------------------------------------------------

def test_offline_update_flow(topo):
    """WAN down: the gateway serves its cache and robots update from it; their events follow once the WAN is back."""
    logs = Logs(topo)
    for robot in topo.robot_names:
        topo.cut_edge(robot)
    version = publish_good(topo, next_version(topo))
    logs.wait("gateway", rf"verified app {re.escape(version)} .*serving it to robots")
    topo.cut_wan()
    for robot in topo.robot_names:
        topo.restore_edge(robot)
    wait_settled(topo, version)
    topo.good = version
    assert not topo.link_up("gateway", "wan0")
    assert not {(r, "installed", version) for r in topo.robot_names} & events_at_dashboard(topo)
    for robot in topo.robot_names:
        assert f"installed app {version}" in logs.new(robot)
    topo.restore_wan()
    wait_until(lambda: {(r, "installed", version) for r in topo.robot_names} <= events_at_dashboard(topo), 30,
               "the offline installs reported at the dashboard")
    wait_until(lambda: all(r["version"] == version for r in topo.status_json()["robots"]), 30,
               f"/status.json showing every robot on {version}")


def test_network_loss_resumes_and_retries(topo):
    """Links cut mid-download, WAN (gateway) then edge (robot r1): both resume from their .part, not from zero."""
    logs = Logs(topo)
    size = 2 * MiB
    topo.rate_limit("gateway", "8mbit")
    topo.rate_limit("r1", "8mbit")
    wan_start = topo.rx_bytes("gateway", "wan0")
    flap = topo.cut_download_after("gateway", MiB, down_for=4)
    version = publish_good(topo, next_version(topo), size=size)
    cut_at = flap.wait()
    logs.wait("gateway", r"sync failed, retrying in \d+s: GET .*app-v" + re.escape(version))
    logs.wait("gateway", rf"verified app {re.escape(version)} ", timeout=60)
    wan_total = topo.rx_bytes("gateway", "wan0") - wan_start
    assert cut_at < size and wan_total < 1.25 * size, f"gateway received {wan_total} bytes for a {size}-byte release"
    # The robots: r1's edge link drops half way through its download.
    r1_start = topo.rx_bytes("r1", "edge0")
    flap = topo.cut_download_after("r1", MiB, down_for=4)
    flap.wait()
    logs.wait("r1", r"gateway unreachable, retrying in \d+s")
    wait_settled(topo, version, timeout=60)
    topo.good = version
    r1_total = topo.rx_bytes("r1", "edge0") - r1_start
    assert r1_total < 1.25 * size, f"r1 received {r1_total} bytes for a {size}-byte release"
    assert logs.new("r1").count(f"downloading app {version}") >= 2  # the first attempt was cut


def test_download_error_backs_off(topo):
    """Downloads that fail: the gateway retries with backoff until the file appears; robots back off from a dead gateway."""
    logs = Logs(topo)
    version = next_version(topo)
    manifest, artifact = topo.publish_without_artifact(version)
    logs.wait("gateway", rf"sync failed, retrying in \d+s: .*{re.escape(manifest['artifact'])}.*404")
    topo.kill9("gateway")
    def retries() -> list[int]:
        found = [int(d) for d in re.findall(r"gateway unreachable, retrying in (\d+)s", logs.new("r1"))]
        return found if len(found) >= 5 else []

    delays = wait_until(retries, 40, "five retries by r1", interval=0.2)
    # Equal-jitter backoff: ceilings 1, 2, 4, then BACKOFF_MAX=4; each delay is half its ceiling or more.
    assert delays[0] <= 1 and all(2 <= d <= 4 for d in delays[2:5]), f"r1's retry delays do not back off: {delays}"
    assert all(topo.current(r) == topo.good for r in topo.robot_names)
    topo.start_daemon("gateway")
    tmp = topo.site.ota / f".{manifest['artifact']}.tmp"  # dotfiles are never served
    tmp.write_bytes(artifact.read_bytes())
    tmp.rename(topo.site.ota / manifest["artifact"])
    topo.sampler.verified.add(manifest["sha256"])
    wait_settled(topo, version, timeout=60)
    topo.good = version
    # One line per change of reason, not one per retry.
    assert logs.new("gateway").count("404") <= 2


def test_hash_mismatch_is_rejected(topo):
    """Rejected by the gateway (tampered at the dashboard) and by the robot itself (changed in the gateway's cache)."""
    logs = Logs(topo)
    tampered = next_version(topo)
    topo.sampler.forbidden.add(tampered)
    topo.publish_tampered(tampered)
    logs.wait("gateway", rf"rejected app {re.escape(tampered)}: .*sha256")
    code, body = topo.http_get("r1", "http://10.231.2.1:8081/manifest")
    assert json.loads(body)["version"] == topo.good, "the gateway serves a release it rejected"
    # Now a good release whose copy in the gateway's cache rots before the robots fetch it.
    for robot in topo.robot_names:
        topo.cut_edge(robot)
    rotten = next_version(topo)
    manifest = topo.release(rotten)
    topo.sampler.forbidden.add(rotten)
    logs.wait("gateway", rf"verified app {re.escape(rotten)} ")
    flip_byte(topo.root / "gateway-state" / "cache" / "files" / manifest["artifact"])
    for robot in topo.robot_names:
        topo.restore_edge(robot)
    for robot in topo.robot_names:
        logs.wait(robot, rf"rejected app {re.escape(rotten)}: sha256")
    assert all(topo.current(r) == topo.good for r in topo.robot_names)
    wait_until(lambda: {(r, "rejected", rotten) for r in topo.robot_names} <= events_at_dashboard(topo), 30,
               "the rejections reported at the dashboard")


def test_signature_failure_is_rejected(topo):
    """Signed by an unknown key: the gateway rejects it; a gateway made to trust that key cannot get it installed."""
    logs = Logs(topo)
    version = next_version(topo)
    topo.sampler.forbidden.add(version)
    topo.publish_unknown_key(version, topo.stranger_key)
    logs.wait("gateway", rf"rejected app {re.escape(version)}: .*signed by an unknown key")
    stranger_pub = topo.stranger_key.with_suffix(".pub")
    try:  # a gateway misconfigured (or compromised) to trust the stranger's key, via an environment override
        topo.restart("gateway", env={"TRUSTED_KEYS": f"{topo.site.pub} {stranger_pub}"})
        logs.wait("gateway", rf"verified app {re.escape(version)} ")
        for robot in topo.robot_names:
            logs.wait(robot, rf"rejected app {re.escape(version)}: .*signed by an unknown key")
        assert all(topo.current(r) == topo.good for r in topo.robot_names)
        wait_until(lambda: {(r, "rejected", version) for r in topo.robot_names} <= events_at_dashboard(topo), 30,
                   "the rejections reported at the dashboard")
    finally:
        topo.daemons["gateway"].env.pop("TRUSTED_KEYS", None)
        topo.restart("gateway")


def test_healthcheck_failure_rolls_back(topo):
    logs = Logs(topo)
    previous = topo.good
    version = next_version(topo)
    manifest = topo.publish_failing(version, "echo 'wheels jammed' >&2; exit 3")
    topo.sampler.verified.add(manifest["sha256"])
    for robot in topo.robot_names:
        logs.wait(robot, rf"rolled back app {re.escape(version)} to {re.escape(previous)}: self-test failed \(exit 3\): wheels jammed")
    wait_until(lambda: {(r, "rolled_back", version) for r in topo.robot_names} <= events_at_dashboard(topo), 30,
               "the rollbacks at the dashboard")
    details = [json.loads(r[4])["detail"] for r in topo.dashboard_rows() if r[3] == "event" and json.loads(r[4])["event"] == "rolled_back"]
    assert any("wheels jammed" in d for d in details)
    # Leave the site as found: the robots keep retrying this version until they blacklist it.
    for robot in topo.robot_names:
        logs.wait(robot, rf"blacklisted app {re.escape(version)}", timeout=60)
        assert topo.current(robot) == previous
        assert (topo.root / f"{robot}-restarts.log").read_text().splitlines()[-1] == f"restarted {previous}"


def test_repeated_failure_blacklists(topo):
    logs = Logs(topo)
    version = next_version(topo)
    manifest = topo.publish_failing(version)
    topo.sampler.verified.add(manifest["sha256"])
    for robot in topo.robot_names:
        logs.wait(robot, rf"blacklisted app {re.escape(version)} after 3 failed attempts", timeout=60)
        assert topo.state(robot)["blacklist"][-1] == version
    polls = {r: topo.state_dir(r) / "last_poll" for r in topo.robot_names}
    seen = {r: {polls[r].read_text()} for r in topo.robot_names}
    wait_until(lambda: all(seen[r].add(polls[r].read_text()) or len(seen[r]) >= 3 for r in topo.robot_names), 20,
               "two more polls by every robot")
    for robot in topo.robot_names:
        assert logs.new(robot).count(f"downloading app {version}") == 3, f"{robot} downloaded a blacklisted release again"
        assert topo.current(robot) == topo.good
    wait_until(lambda: {(r, "blacklisted", version) for r in topo.robot_names} <= events_at_dashboard(topo), 30,
               "the blacklistings at the dashboard")
    # A blacklisted version does not wedge the robot: the next good release installs.
    topo.good = publish_good(topo, next_version(topo))
    wait_settled(topo, topo.good)


def test_devices_never_enter_broken_states(topo):
    """kill -9 robots in the middle of installs and rollbacks; the 50 ms sampler must see nothing broken."""
    samples = topo.sampler.samples
    logs = Logs(topo)
    kills = 0
    for number in range(4):
        failing = number % 2 == 1
        version = next_version(topo)
        manifest = topo.publish_failing(version, "sleep 0.5; exit 1") if failing else topo.release(version, selftest="sleep 0.5")
        topo.sampler.verified.add(manifest["sha256"])
        robot = topo.robot_names[number % len(topo.robot_names)]
        logs.wait(robot, rf"activated app {re.escape(version)}", timeout=30)
        topo.kill9(robot)
        kills += 1
        topo.start_daemon(robot)
        if not failing:
            topo.good = version
        wait_settled(topo, topo.good, timeout=60) if not failing else None
    for robot in topo.robot_names:
        wait_until(lambda: topo.state(robot).get("phase") == "idle", 60, f"{robot} idle")
    wait_settled(topo, topo.good)
    assert kills == 4 and topo.sampler.samples > samples + 40
    assert topo.sampler.problems == []
