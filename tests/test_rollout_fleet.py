"""Staged rollouts across a fleet (issue 15's "Must hold"): one dashboard, two sites of 5 robots.

Every daemon is the real one, in its own network namespace (tests/rollout_fleet.py):
otad-dashboard holding the rollout key, two otad-gateways, ten otad-robots, each
with its telemetry-agent. Operators use the real `otad-release rollout` CLI.
A WAN cut is the gateway's wan0 link going down. `PhaseSampler` checks every
50 ms, for the whole test, that no robot runs a rollout's target before its
phase started at its site.

The fleet starts empty: a first rollout (app-1, 1.0.0 to every robot in one
phase) installs 1.0.0 everywhere, as it would on a fresh site under ROLLOUT_KEYS.
"""
from __future__ import annotations

import random
import re
import time

import pytest

from harness import wait_until
from rollout_fleet import SITES, PhaseSampler, RolloutFleet
from topology import cleanup_stale, skip_reason

pytestmark = [pytest.mark.slow, pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]
FAIL_ON = ("a1", "a2", "b1")  # the robots whose self-test fails release 2.0.0 in the failing-release test


@pytest.fixture
def rollout_fleet(tmp_path, keypair, role_keys):
    cleanup_stale()
    made: list[RolloutFleet] = []

    def make(**start) -> RolloutFleet:
        fleet = RolloutFleet(tmp_path, *keypair, role_keys["folder"]).build()
        made.append(fleet)
        fleet.site.release("1.0.0")
        fleet.start(**start)
        fleet.create({"rollout_id": "app-1", "version": "1.0.0", "phases": [{"percent": 100}]})
        fleet.wait_settled(fleet.gateway_of, "1.0.0")
        return fleet

    yield make
    for fleet in made:
        assert fleet.teardown() == []


def publish(fleet: RolloutFleet, version: str, **build) -> None:
    fleet.site.release(version, **build)
    for gw in SITES:
        fleet.daemons[gw].wait_for_log(r"verified app " + re.escape(version), 60)


def waits_for_approval(fleet: RolloutFleet, gw: str, rid: str, phase: int) -> bool:
    return f"rollout {rid} phase {phase - 1}: phase {phase} waits for an operator's approval" in fleet.log(gw)


def test_a_canary_then_50_and_100_percent_an_approval_gate_and_a_robot_that_was_away(rollout_fleet):
    fleet = rollout_fleet()
    sampler = PhaseSampler(fleet).start()
    publish(fleet, "2.0.0")
    plan = fleet.create({"rollout_id": "rollout-2", "version": "2.0.0", "from": ["1.0.0"], "phases": [
        {"robots": ["a1", "b1"], "min_soak_s": 4, "halt": {"site": {"max_failures": 0}}},
        {"percent": 50, "min_soak_s": 4, "advance": "approve"},
        {"percent": 100}]})
    canary, half, rest = (fleet.in_phase("rollout-2", n) for n in range(3))
    assert canary == ["a1", "b1"] and half and rest, f"cohorts of rollout-2: {canary}, {half}, {rest}"
    away = rest[-1]  # away for the whole rollout: back only once 3.0.0 is the newest release
    fleet.cut_edge(away)

    fleet.wait_settled(canary, "2.0.0")
    fleet.wait_settled(half, "2.0.0", timeout=60)
    for gw in SITES:
        wait_until(lambda: waits_for_approval(fleet, gw, "rollout-2", 2), 60, f"{gw} to wait for the approval of phase 2")
    assert all(fleet.current(r) == "1.0.0" for r in rest), "phase 2 installed before its approval"

    fleet.rollout("approve", "rollout-2", "--reason", "canary and half look good")
    fleet.wait_settled([r for r in rest if r != away], "2.0.0")
    status = fleet.status("rollout-2")
    for gw in SITES:
        assert fleet.started(gw, "rollout-2") == {0, 1, 2}
        wait_until(lambda: gw in (s := fleet.status("rollout-2"))["site_reports"], 30, f"{gw}'s report at the dashboard")
    assert status["state"] == "active"

    # 3.0.0 becomes the newest release, for one canary robot only; then the away robot returns.
    publish(fleet, "3.0.0")
    fleet.create({"rollout_id": "app-3", "version": "3.0.0", "from": ["2.0.0"], "phases": [
        {"robots": ["a1"], "advance": "approve"}, {"percent": 100}]})
    fleet.wait_settled(["a1"], "3.0.0")
    fleet.restore_edge(away)
    fleet.wait_settled([away], "2.0.0")  # what rollout-2 assigns it, not the newest (3.0.0)
    others = [r for r in fleet.gateway_of if r != "a1"]
    assert all(fleet.current(r) == "2.0.0" for r in others), {r: fleet.current(r) for r in others}
    assert sampler.stop() == [] and sampler.samples > 100, sampler.violations[:5]


def test_a_failing_release_halts_the_dark_site_by_itself_and_the_online_site_by_the_fleet(rollout_fleet):
    fleet = rollout_fleet()
    sampler = PhaseSampler(fleet).start()
    failing = " | ".join(f"*/{r}-app" for r in FAIL_ON)
    publish(fleet, "2.0.0", selftest=f'case "$OTAD_APP_DIR" in {failing}) echo "arm calibration failed" >&2; exit 3;; esac')
    fleet.create({"rollout_id": "rollout-2", "version": "2.0.0", "from": ["1.0.0"], "on_halt": "rollback",
                  "offline_policy": "continue", "offline_max_phase": 1, "phases": [
                      {"robots": ["a1", "a2", "b1", "b2"], "min_soak_s": 120,
                       "halt": {"site": {"max_failures": 1}, "fleet": {"max_failure_rate": 0.2, "min_attempts": 2}}},
                      {"percent": 100}]})
    fleet.daemons["gwa"].wait_for_log(r"rollout rollout-2 phase 0: started at site gwa")
    fleet.cut_wan("gwa")

    # Site A, dark: its two canaries fail, it halts on its own (max_failures 1 at the site).
    fleet.daemons["gwa"].wait_for_log(r"rollout rollout-2 phase 0: site gwa halted \(robots on the target return\): "
                                      r"phase 0 at site gwa: 2 failed, more than max_failures 1", 120)
    # Site B, online: one of its two canaries fails, under its own criterion, so the dashboard's
    # fleet-wide rate halts it once both have finished (min_attempts 2: A's are not there, A is dark),
    # and b2, which committed 2.0.0, returns to 1.0.0.
    fleet.daemons["dashboard"].wait_for_log(r"rollout rollout-2 revision 2 phase 0 halted fleet-wide .*1 of 2 failed", 120)
    fleet.daemons["gwb"].wait_for_log(r"rollout rollout-2: took revision 2 \(aborted", 60)
    fleet.wait_settled(["a1", "a2", "b1", "b2"], "1.0.0")
    assert "installed app 2.0.0" in fleet.log("b2"), "b2 should have committed 2.0.0 before the abort"
    assert "site gwb halted" not in fleet.log("gwb"), "site B's own criterion was not breached: the fleet's was"
    for gw in SITES:
        assert fleet.started(gw, "rollout-2") == {0}, f"{gw} went beyond phase 0"
    assert all(fleet.current(r) == "1.0.0" for r in fleet.gateway_of)

    # A's WAN returns: the dashboard shows what A decided while it was dark, and A takes the abort.
    fleet.restore_wan("gwa")
    report = wait_until(lambda: (s := fleet.status("rollout-2"))["site_reports"].get("gwa", {}).get("halted") and s,
                        60, "site A's halt at the dashboard")["site_reports"]["gwa"]
    assert "phase 0 at site gwa: 2 failed" in report["halted"]["reason"]
    assert report["phases"][0]["counts"]["failed"] == 2 and report["phases"][1]["started_at"] is None
    fleet.daemons["gwa"].wait_for_log(r"rollout rollout-2: took revision 2 \(aborted", 60)
    assert sampler.stop() == [], sampler.violations[:5]


@pytest.mark.parametrize("policy", ["hold", "continue"])
def test_a_dark_site_holds_or_continues_only_up_to_offline_max_phase(rollout_fleet, policy):
    fleet = rollout_fleet()
    sampler = PhaseSampler(fleet).start()
    publish(fleet, "2.0.0")
    fleet.create({"rollout_id": "rollout-2", "version": "2.0.0", "from": ["1.0.0"], "offline_policy": policy,
                  "offline_max_phase": 1, "phases": [{"robots": ["a1", "b1"], "min_soak_s": 3},
                                                     {"percent": 50, "min_soak_s": 3}, {"percent": 100}]})
    fleet.daemons["gwa"].wait_for_log(r"rollout rollout-2 phase 0: started at site gwa")
    fleet.cut_wan("gwa")
    fleet.wait_settled(fleet.robots["gwb"], "2.0.0")  # site B, online, goes all the way
    expected = {0} if policy == "hold" else {0, 1}
    why = ("offline_policy=hold: no new phase" if policy == "hold"
           else "phase 2 is beyond offline_max_phase 1")
    fleet.daemons["gwa"].wait_for_log(why, 60)
    assert fleet.started("gwa", "rollout-2") == expected
    site_a = fleet.robots["gwa"]
    allowed = [r for n in expected for r in fleet.in_phase("rollout-2", n) if r in site_a]
    fleet.wait_settled(allowed, "2.0.0")  # the phases the dark site opened do install
    assert [r for r in site_a if fleet.current(r) == "2.0.0"] == allowed
    fleet.restore_wan("gwa")
    fleet.wait_settled(site_a, "2.0.0")
    assert fleet.started("gwa", "rollout-2") == {0, 1, 2}
    assert sampler.stop() == [], sampler.violations[:5]


def test_kill9_of_a_gateway_and_the_dashboard_during_a_rollout_converges(rollout_fleet):
    """30 cycles of kill -9 at random moments (seeded): the site's phase starts and counts come out as
    the untouched site's do, and no robot installs outside its phase at any sample."""
    fleet = rollout_fleet()
    sampler = PhaseSampler(fleet).start()
    publish(fleet, "2.0.0")
    soak = 20  # the three phases take over 40 s: the 30 cycles fall within the rollout
    fleet.create({"rollout_id": "rollout-2", "version": "2.0.0", "from": ["1.0.0"], "phases": [
        {"robots": ["a1", "b1"], "min_soak_s": soak}, {"percent": 50, "min_soak_s": soak}, {"percent": 100}]})
    rng = random.Random(1515)
    for _ in range(30):
        victims = rng.choice([["gwa"], ["dashboard"], ["gwa", "dashboard"]])
        time.sleep(rng.uniform(0.2, 1.5))  # a random moment to pull the plug, not a wait for anything
        for name in victims:
            fleet.restart(name)
    fleet.wait_settled(fleet.gateway_of, "2.0.0", timeout=180)
    reports = {}
    for gw in SITES:
        assert fleet.started(gw, "rollout-2") == {0, 1, 2}
        reports[gw] = wait_until(lambda: (r := fleet.status("rollout-2")["site_reports"].get(gw)) and
                                 sum(p["counts"]["committed"] for p in r["phases"]) == 5 and r, 60, f"{gw}'s full report")
    for gw in SITES:
        counts = [p["counts"] for p in reports[gw]["phases"]]
        assert sum(c["committed"] for c in counts) == 5 and all(c["failed"] == 0 for c in counts), counts
        starts = [p["started_at"] for p in reports[gw]["phases"]]
        assert starts[1] >= starts[0] + soak and starts[2] >= starts[1] + soak, starts
    assert sampler.stop() == [], sampler.violations[:5]
