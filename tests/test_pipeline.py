"""Both pipelines end to end with every real daemon: releases reach robots, their telemetry reaches the dashboard."""
from __future__ import annotations

import sqlite3

import requests

from fleet import Site, dashboard_records, wait_for_version, write_tokens
from harness import wait_until


def robot_status(site, robot: str) -> dict | None:
    doc = requests.get(f"{site.dashboard.url}/status.json", timeout=5).json()
    return next((r for r in doc["robots"] if r["robot_id"] == robot), None)


def events_at_dashboard(site) -> list[tuple[str, str, str]]:
    import json

    rows = dashboard_records(site.root / "dashboard-state" / "telemetry.db")
    return [(r[0], json.loads(r[4])["event"], json.loads(r[4])["version"]) for r in rows if r[3] == "event"]


def test_release_and_telemetry_pipelines_together(tmp_path, keypair):
    key, pub = keypair
    site = Site(tmp_path, key, pub)
    tokens = write_tokens(tmp_path, ["r1", "r2"])
    site.start_dashboard(TOKENS_FILE=tokens["dashboard"])
    try:
        site.release("1.0.0")
        gw = site.gateway(TOKEN_FILE=tokens["gateway_own"], ROBOT_TOKENS_FILE=tokens["robots"]).start()
        wait_for_version(gw.url, "1.0.0")
        agents = {}
        for name in ("r1", "r2"):
            site.robot(gw.url, name=name).start(wait_listening=False)
            agents[name] = site.agent(gw.url, name=name).start(wait_listening=False)
        wait_until(lambda: all((s := robot_status(site, n)) and s["version"] == "1.0.0" for n in ("r1", "r2")), 40,
                   "both robots reporting 1.0.0 at the dashboard")
        site.release("1.1.0", selftest="echo 'arm calibration failed' >&2; exit 2")
        wait_until(lambda: {("r1", "rolled_back", "1.1.0"), ("r2", "rolled_back", "1.1.0")} <= set(events_at_dashboard(site)),
                   60, "both rollbacks at the dashboard")
        # The WAN goes down: telemetry waits at the gateway, then arrives once, in order.
        site.dashboard.stop()
        gw.wait_for_log("telemetry: forwarding failed, buffering")
        before = {n: robot_status_offline(site, n) for n in ("r1", "r2")}
        site.dashboard.start()
        wait_until(lambda: all(robot_status_offline(site, n) > before[n] + 2 for n in ("r1", "r2")), 40,
                   "fresh records after reconnecting")
        for name in ("r1", "r2"):
            assert agents[name].stop() == 0
            # seqs start above the boot clock: count what the spool numbered and no longer holds.
            with sqlite3.connect(site.root / f"{name}-agent-state" / "spool.db") as conn:
                sent = conn.execute("SELECT sum(issued) FROM counters").fetchone()[0]
                sent -= conn.execute("SELECT count(*) FROM records").fetchone()[0]
            wait_until(lambda: len([r for r in dashboard_records(site.root / "dashboard-state" / "telemetry.db")
                                    if r[0] == name]) >= sent, 20, f"all {sent} records of {name}")
        rows = dashboard_records(site.root / "dashboard-state" / "telemetry.db")
        for name in ("r1", "r2"):
            seqs = [r[2] for r in rows if r[0] == name]
            assert seqs == sorted(seqs) and len(seqs) == len(set(seqs)), f"{name}: duplicated or out of order"
        page = requests.get(f"{site.dashboard.url}/status", timeout=5).text
        assert "rolled_back" in page and "arm calibration failed" in page
    finally:
        site.stop_all()


def robot_status_offline(site, robot: str) -> int:
    """How many records of the robot the dashboard holds (read from its database)."""
    rows = dashboard_records(site.root / "dashboard-state" / "telemetry.db")
    return sum(1 for r in rows if r[0] == robot)
