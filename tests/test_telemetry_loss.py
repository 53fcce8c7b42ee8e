"""Telemetry losses through the real agent, gateway and dashboard: never silent, counted exactly, per robot.

A seq is never reused within a boot whatever happens to the agent's spool; a
seq that goes backwards anyway (an old agent, two robots under one id) is
refused, logged and counted; every record dropped by a full spool or a full
gateway buffer is counted once, for the robot that lost it, so that
made = held + dropped.
"""
from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest
import requests

from fleet import metric, post_records
from harness import wait_until
from notify import NotifySocket
from otad.agent.spool import Spool
from otad.robot.outbox import Outbox
from test_telemetry import FlakyDashboard, held, start_gateway, tele  # noqa: F401 (tele is a fixture)

BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def status(site) -> dict:
    return requests.get(f"{site.dashboard.url}/status.json", timeout=5).json()


def robot_status(site, robot: str) -> dict:
    return next((r for r in status(site)["robots"] if r["robot_id"] == robot), {})


def held_metrics(site, robot: str) -> list[int]:
    return [seq for r, _, seq, kind, _ in held(site) if r == robot and kind == "metric"]


def start_agent(site, gateway_url: str, env: dict | None = None, **overrides):
    agent = site.agent(gateway_url, name="r1", **overrides)
    agent.env.update(env or {})
    agent.start(wait_listening=False)
    agent.wait_for_log(r"telemetry-agent \S+ ready")
    return agent


@pytest.mark.parametrize("loss", ["spool.db removed by hand", "STATE_DIR changed"])
def test_a_spool_lost_within_the_boot_never_reuses_a_seq(tele, loss):
    """Issue 13 item 1. Before: the new spool numbered from 1 again, the gateway answered
    200 with every record a duplicate, and the agent deleted them: acknowledged, then lost.
    A container recreated under the host's boot_id is the same case as a new STATE_DIR."""
    gw = start_gateway(tele)
    agent = start_agent(tele, gw.url)
    wait_until(lambda: len(held_metrics(tele, "r1")) >= 3, 30, "three metrics from the first spool")
    assert agent.stop() == 0
    first = len(held_metrics(tele, "r1"))
    state = tele.root / "r1-agent-state"
    if loss == "spool.db removed by hand":
        for path in state.glob("spool.db*"):
            path.unlink()
    else:
        state = tele.root / "container-2"
    # The robot's update events, spooled at once by the new agent: on main they got seq 1, 2, 3.
    outbox = Outbox(tele.root / "r1-state")
    for name in ("installed", "rolled_back", "blacklisted"):
        outbox.add(name, "1.0.1", f"after the spool was lost: {name}")
    start_agent(tele, gw.url, STATE_DIR=state)

    def events() -> list[str]:
        return [json.loads(body)["event"] for robot, _, _, kind, body in held(tele) if kind == "event"]

    wait_until(lambda: events() == ["installed", "rolled_back", "blacklisted"], 30,
               "the new spool's events at the dashboard, none taken for a duplicate")
    wait_until(lambda: len(held_metrics(tele, "r1")) >= first + 3, 30, "three metrics from the new spool")
    seqs = held_metrics(tele, "r1")
    assert seqs == sorted(set(seqs)), "every seq once, in the robot's order"
    assert "below its last seq" not in gw.new_log()


def test_a_seq_going_backwards_is_refused_logged_counted_and_shown(tele, tmp_path):
    """Issue 13 item 1 (also). Before: the gateway acknowledged such records as duplicates
    and dropped them without a word. Not counted as lost on the dashboard: a late resend
    looks the same (docs/formats.md)."""
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        gw = tele.gateway(env={"NOTIFY_SOCKET": notify.path}, TOKEN_FILE=tele.tokens["gateway_own"],
                          ROBOT_TOKENS_FILE=tele.tokens["robots"]).start()
        assert post_records(gw.url, "r1", [metric("r1", s) for s in range(1, 6)]).json()["accepted"] == 5
        # A resend of that request (its answer was lost) is only a duplicate...
        assert post_records(gw.url, "r1", [metric("r1", s) for s in range(1, 6)]).json() == {
            "accepted": 0, "duplicates": 5, "refused": 0}
        assert post_records(gw.url, "r1", [metric("r1", 6)]).json()["accepted"] == 1
        # ...but new records numbered from 1 again (an agent whose spool was reset) are not.
        reply = post_records(gw.url, "r1", [metric("r1", s, cpu=77.0) for s in range(1, 4)]).json()
        assert reply == {"accepted": 0, "duplicates": 0, "refused": 3}
        gw.wait_for_log(r"robot r1 boot boot-1 sent seq 1, below its last seq 6: refused 3 records")
        wait_until(lambda: any("3 refused (seq went backwards)" in m for m in notify.drain()), 15, "STATUS= counting them")
    finally:
        notify.close()
    wait_until(lambda: len(held_metrics(tele, "r1")) == 6, 15, "the six stored metrics at the dashboard")
    assert held_metrics(tele, "r1") == [1, 2, 3, 4, 5, 6]  # the refused ones did not overwrite anything


def test_the_bound_hit_during_a_flush_counts_made_as_held_plus_dropped(tele):
    """Issue 13 items 5 and 7. A batch is at the dashboard's door (held by a proxy) while the
    gateway's buffer overflows. Before: the bound dropped rows of that batch, the dashboard
    stored them and also counted them as dropped (4,600 made, 4,100 held, 1,000 dropped)."""
    flaky = FlakyDashboard(tele.dashboard.url)
    flaky.mode = "pass"
    flaky.gate.clear()
    gw = start_gateway(tele, dashboard_url=flaky.url, TELEMETRY_MAX_MB=1, READ_TIMEOUT=120)
    made = {"r1": 0, "r2": 0}
    seq = {"r1": 0, "r2": 0}

    def post(robot: str, count: int) -> None:
        records = []
        for _ in range(count):
            seq[robot] += 1
            records.append({**metric(robot, seq[robot]), "version": "1.0.0-" + "x" * 40})
        assert post_records(gw.url, robot, records).status_code == 200
        made[robot] += count

    try:
        post("r1", 50)
        assert flaky.at_gate.wait(30), "the first batch at the dashboard's door"
        for i in range(120):  # about 3 MiB into a 1 MiB buffer, while that batch is in flight
            post("r1" if i % 3 else "r2", 100)
        gw.wait_for_log("telemetry buffer full: dropped")
    finally:
        flaky.gate.set()

    def flushed():
        doc = status(tele)
        return doc["gateways"] and doc["gateways"][0]["backlog"] == 0 and gw_empty(tele) and doc

    doc = wait_until(flushed, 90, "the gateway's backlog flushed")
    kept = {robot: len(held_metrics(tele, robot)) for robot in made}
    total_dropped = doc["gateways"][0]["dropped"]
    assert total_dropped > 0
    assert sum(kept.values()) + total_dropped == sum(made.values()), (made, kept, total_dropped)
    dropped = {r["robot_id"]: r["dropped_gateway"] for r in doc["robots"]}
    for robot in made:
        assert kept[robot] + dropped[robot] == made[robot], (robot, made, kept, dropped)
    assert total_dropped == sum(dropped.values())
    flaky.close()


def gw_empty(site) -> bool:
    with sqlite3.connect(f"file:{site.root / 'gw-state' / 'telemetry.db'}?mode=ro", uri=True, timeout=10) as conn:
        return conn.execute("SELECT count(*) FROM records").fetchone()[0] == 0


def test_metrics_a_full_spool_dropped_reach_the_dashboard_per_robot_and_gateway(tele):
    """Issue 13 item 7. Before: the agent only logged its drops; the dashboard showed none.
    The spool is filled near its bound through the real module first (through the process,
    1 MiB at INTERVAL=1 would take over an hour), then the real agent overflows it while its
    gateway is down, and the real gateway and dashboard carry the count."""
    gw = start_gateway(tele)
    gw.pin_port()
    gw.stop()
    spool_path = tele.root / "r1-agent-state" / "spool.db"
    spool = Spool(spool_path, 1024 * 1024)
    sample = {"robot_id": "r1", "boot_id": BOOT_ID, "ts": "2026-05-09T10:00:00Z", "type": "metric",
              "cpu": 1.0, "mem": 2.0, "version": "1.0.0", "health": "ok"}
    while spool.used_bytes() < 0.995 * spool.max_bytes:
        spool.add(sample)
    assert spool.dropped == 0
    spool.close()
    agent = start_agent(tele, gw.url, SPOOL_MAX_MB=1)
    match = agent.wait_for_log(r"dropped the (\d+) oldest metrics", 60)
    gw.start()
    wait_until(lambda: robot_status(tele, "r1").get("dropped_agent", 0) >= int(match[1]), 60,
               "the spool's drop counted for r1 at the dashboard")
    assert agent.stop() == 0
    lost = sum(int(n) for n in re.findall(r"dropped the (\d+) oldest metrics", agent.new_log()))
    with sqlite3.connect(spool_path) as conn:
        issued = conn.execute("SELECT sum(issued) FROM counters").fetchone()[0]
        waiting = conn.execute("SELECT count(*) FROM records").fetchone()[0]
    wait_until(lambda: robot_status(tele, "r1")["dropped_agent"] == lost, 30, "every drop counted")

    def accounted():  # every record the spool numbered is at the dashboard, dropped, or still in the spool
        reports = [r for r in held(tele) if r[3] == "dropped"]
        return len(held_metrics(tele, "r1")) + lost + waiting == issued - len(reports)

    wait_until(accounted, 30, "made = held + dropped + waiting, exactly")
    doc = status(tele)
    assert doc["gateways"][0]["dropped_agent"] == lost and doc["totals"]["dropped"]["agent"] == lost
    assert f"{lost:,} lost" in requests.get(f"{tele.dashboard.url}/status", timeout=5).text
