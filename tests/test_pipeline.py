"""Both pipelines end to end with every real daemon: releases reach robots, their telemetry reaches the dashboard."""
from __future__ import annotations

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
        for name in ("r1", "r2"):
            site.robot(gw.url, name=name).start(wait_listening=False)
            site.agent(gw.url, name=name).start(wait_listening=False)
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
        wait_until(lambda: all((s := robot_status(site, n)) and s["last_seq"] > before[n] + 2 for n in ("r1", "r2")), 40,
                   "fresh records after reconnecting")
        rows = dashboard_records(site.root / "dashboard-state" / "telemetry.db")
        for name in ("r1", "r2"):
            seqs = [r[2] for r in rows if r[0] == name]
            assert seqs == sorted(seqs) and len(seqs) == len(set(seqs)), f"{name}: duplicated or out of order"
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{name}: a record is missing"
        page = requests.get(f"{site.dashboard.url}/status", timeout=5).text
        assert "rolled_back" in page and "arm calibration failed" in page
    finally:
        site.stop_all()


def robot_status_offline(site, robot: str) -> int:
    rows = dashboard_records(site.root / "dashboard-state" / "telemetry.db")
    return max((r[2] for r in rows if r[0] == robot), default=0)
