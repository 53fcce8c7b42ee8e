"""Telemetry store-and-forward through a real gateway and dashboard: nothing lost, duplicated or reordered.

The robots here are the test itself posting records over real HTTP (the
telemetry agent's own tests cover the agent); gateway and dashboard are the
real daemons with real SQLite files.
"""
from __future__ import annotations

import json
import random
import sqlite3
import threading

import pytest
import requests

from fleet import (GATEWAY_TOKEN, Site, dashboard_records, event, metric, post_records, robot_token, write_tokens)
from harness import wait_until


@pytest.fixture
def tele(tmp_path, keypair):
    key, pub = keypair
    site = Site(tmp_path, key, pub)
    site.tokens = write_tokens(tmp_path, ["r1", "r2", "r3"])
    site.start_dashboard(TOKENS_FILE=site.tokens["dashboard"])
    site.db = tmp_path / "dashboard-state" / "telemetry.db"
    yield site
    site.stop_all()


def start_gateway(site, dashboard_url=None, **overrides):
    return site.gateway(dashboard_url=dashboard_url, TOKEN_FILE=site.tokens["gateway_own"],
                        ROBOT_TOKENS_FILE=site.tokens["robots"], **overrides).start()


def held(site) -> list[tuple]:
    return dashboard_records(site.db) if site.db.exists() else []


def assert_exactly_once_in_order(rows: list[tuple], expected: dict[str, int]) -> None:
    """Every robot's seq 1..n exactly once, in seq order of arrival."""
    by_robot: dict[str, list[int]] = {}
    for robot, boot, seq, kind, _ in rows:
        if kind != "gap":
            by_robot.setdefault(robot, []).append(seq)
    for robot, count in expected.items():
        assert by_robot.get(robot) == list(range(1, count + 1)), f"{robot}: {by_robot.get(robot, [])[:20]}..."


def test_records_flow_to_the_dashboard_and_status(tele):
    gw = start_gateway(tele)
    assert post_records(gw.url, "r1", [metric("r1", 1), metric("r1", 2, cpu=55.0)]).json() == {"accepted": 2, "duplicates": 0, "refused": 0}
    assert post_records(gw.url, "r1", [event("r1", 3, "rolled_back")]).status_code == 200
    wait_until(lambda: len(held(tele)) == 3, 15, "3 records at the dashboard")
    status = requests.get(f"{tele.dashboard.url}/status.json", timeout=5).json()
    robot = next(r for r in status["robots"] if r["robot_id"] == "r1")
    assert (robot["records"], robot["last_seq"], robot["cpu"], robot["version"]) == (3, 3, 55.0, "1.0.0")
    assert status["gateways"][0]["gateway_id"] == "gw"
    assert status["events"][0]["event"] == "rolled_back"
    page = requests.get(f"{tele.dashboard.url}/status", timeout=5)
    assert page.status_code == 200 and "r1" in page.text and 'class="bad"' in page.text
    # A retried request (its answer was lost) is acknowledged, not stored twice.
    assert post_records(gw.url, "r1", [event("r1", 3, "rolled_back")]).json() == {"accepted": 0, "duplicates": 1, "refused": 0}


def test_wan_outage_buffers_then_flushes_exactly_once_in_order(tele):
    gw = start_gateway(tele)
    tele.dashboard.stop()
    for seq in range(1, 301):
        for robot in ("r1", "r2"):
            assert post_records(gw.url, robot, [metric(robot, seq)]).status_code == 200
    gw.wait_for_log("telemetry: forwarding failed, buffering")
    tele.dashboard.start()
    wait_until(lambda: len(held(tele)) == 600, 30, "600 records after reconnect")
    assert_exactly_once_in_order(held(tele), {"r1": 300, "r2": 300})
    gw.wait_for_log("telemetry: dashboard reachable again")


class FlakyDashboard:
    """An HTTP stand-in in front of the real dashboard: answers 500, hangs, or holds requests at its gate while told to."""

    def __init__(self, upstream: str) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.mode = "500"
        self.failures = 0
        self.gate = threading.Event()  # cleared: a request to pass waits at the door until it is set
        self.gate.set()
        self.at_gate = threading.Event()
        flaky = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if flaky.mode == "500":
                    flaky.failures += 1
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if flaky.mode == "hang":
                    flaky.failures += 1
                    threading.Event().wait(8)  # longer than the gateway's READ_TIMEOUT
                    self.close_connection = True
                    return
                if not flaky.gate.is_set():
                    flaky.at_gate.set()
                    flaky.gate.wait(120)
                response = requests.post(upstream + self.path, data=body, timeout=10, headers={
                    k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type", "content-encoding")})
                self.send_response(response.status_code)
                self.send_header("Content-Length", str(len(response.content)))
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(response.content)

            do_GET = do_POST

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.mark.parametrize("mode", ["500", "hang"])
def test_dashboard_errors_and_timeouts_are_retried(tele, mode):
    flaky = FlakyDashboard(tele.dashboard.url)
    flaky.mode = mode
    try:
        gw = start_gateway(tele, dashboard_url=flaky.url, READ_TIMEOUT=2)
        for seq in range(1, 51):
            assert post_records(gw.url, "r1", [metric("r1", seq)]).status_code == 200
        wait_until(lambda: flaky.failures >= 2, 30, "two failed forwarding attempts")
        assert held(tele) == []
        flaky.mode = "pass"
        wait_until(lambda: len(held(tele)) == 50, 30, "50 records after the dashboard recovers")
        assert_exactly_once_in_order(held(tele), {"r1": 50})
    finally:
        flaky.close()


@pytest.mark.parametrize(
    "body,headers,status",
    [
        (b"{not json", {}, 400),
        (json.dumps({"records": [{**metric("r1", 1), "cpu": "high"}]}).encode(), {}, 400),
        (json.dumps({"records": [{**metric("r1", 1), "cpu": 250}]}).encode(), {}, 400),
        (json.dumps({"records": [{**metric("r1", 1), "type": "weird"}]}).encode(), {}, 400),
        (json.dumps({"records": [{k: v for k, v in metric("r1", 1).items() if k != "seq"}]}).encode(), {}, 400),
        (json.dumps({"records": [metric("r1", i) for i in range(1, 1002)]}).encode(), {}, 413),
        (b'{"records": [' + b" " * (1024 * 1024 + 10) + b"]}", {}, 413),
        (json.dumps({"records": [metric("r2", 1)]}).encode(), {}, 403),
        (json.dumps({"records": [metric("r1", 1)]}).encode(), {"Authorization": "Bearer wrong-token-000000000"}, 401),
        (json.dumps({"records": [metric("r1", 1)]}).encode(), {"Authorization": None}, 401),
    ],
    ids=["bad-json", "wrong-type", "out-of-range", "unknown-type", "missing-field", "too-many", "too-large",
         "other-robot", "wrong-token", "no-token"],
)
def test_gateway_rejects_bad_input_and_keeps_serving(tele, body, headers, status):
    gw = start_gateway(tele)
    sent = {"Authorization": f"Bearer {robot_token('r1')}", "Content-Type": "application/json", **headers}
    response = requests.post(f"{gw.url}/metrics", data=body, headers={k: v for k, v in sent.items() if v}, timeout=10)
    assert response.status_code == status
    assert response.json()["error"]
    assert post_records(gw.url, "r1", [metric("r1", 7)]).status_code == 200
    wait_until(lambda: len(held(tele)) == 1, 15, "the one good record")
    assert held(tele)[0][2] == 7


@pytest.mark.parametrize(
    "body,token,status",
    [(b"{}", GATEWAY_TOKEN, 400), (b"[]", GATEWAY_TOKEN, 400),
     (json.dumps({"gateway_id": "other", "buffer_id": "ab", "records": [{"id": 1, "received": 1.0, "record": metric("r1", 1)}]}).encode(), GATEWAY_TOKEN, 403),
     (json.dumps({"gateway_id": "gw", "buffer_id": "ab", "records": [{"id": 1, "received": 1.0, "record": {"type": "metric"}}]}).encode(), GATEWAY_TOKEN, 400),
     (b"{}", "not-the-token-00000000", 401), (b"{}", None, 401)],
    ids=["empty", "not-object", "other-gateway", "bad-record", "wrong-token", "no-token"],
)
def test_dashboard_rejects_bad_input(tele, body, token, status):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = requests.post(f"{tele.dashboard.url}/metrics", data=body, headers=headers, timeout=10)
    assert response.status_code == status and response.json()["error"]
    assert held(tele) == []
    assert requests.get(f"{tele.dashboard.url}/healthz", timeout=5).status_code == 200


def test_dashboard_replay_changes_nothing(tele):
    payload = {"gateway_id": "gw", "buffer_id": "abc123", "backlog": 0,
               "records": [{"id": i, "received": 1.0, "record": metric("r1", i)} for i in (1, 2, 3)]}
    headers = {"Authorization": f"Bearer {GATEWAY_TOKEN}"}
    first = requests.post(f"{tele.dashboard.url}/metrics", json=payload, headers=headers, timeout=10)
    again = requests.post(f"{tele.dashboard.url}/metrics", json=payload, headers=headers, timeout=10)
    assert first.json() == again.json() == {"acked": 3}
    assert len(held(tele)) == 3


def test_buffer_bound_drops_oldest_metrics_keeps_events_and_counts_the_gap(tele):
    gw = start_gateway(tele, TELEMETRY_MAX_MB=1)
    tele.dashboard.stop()
    seq, events, metrics = 0, 0, 0
    padding = "x" * 300
    for batch in range(100):  # about 2.5 MiB of records into a 1 MiB buffer
        records = []
        for _ in range(100):
            seq += 1
            if seq % 10 == 0:
                records.append({**event("r1", seq, "rolled_back"), "detail": padding})
                events += 1
            else:
                records.append(metric("r1", seq))
                metrics += 1
        assert post_records(gw.url, "r1", records).status_code == 200
        files = sum(p.stat().st_size for p in (tele.root / "gw-state").glob("telemetry.db*"))
        assert files <= 1.1 * 1024 * 1024, f"{files} bytes on disk after batch {batch}"
    gw.wait_for_log("telemetry buffer full: dropped")
    tele.dashboard.start()

    def settled():
        rows = held(tele)
        kinds = [r[3] for r in rows]
        dropped = sum(json.loads(r[4])["dropped"] for r in rows if r[3] == "gap")
        return kinds.count("event") == events and kinds.count("metric") + dropped == metrics and (rows, dropped)

    rows, dropped = wait_until(settled, 60, "every event and an exact account of the metrics")
    assert dropped > 0
    seqs = [r[2] for r in rows if r[3] != "gap"]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
    status = requests.get(f"{tele.dashboard.url}/status.json", timeout=5).json()
    assert status["gateways"][0]["dropped"] == dropped


@pytest.mark.slow
def test_gateway_kill9_loop_loses_and_duplicates_nothing(tele):
    """50 kill -9 of the gateway at random moments while robots post and the forwarder runs."""
    rng = random.Random(20261126)
    gw = start_gateway(tele)
    acked: dict[str, list[int]] = {"r1": [], "r2": []}
    stop = threading.Event()

    def robot(name: str) -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            batch = [metric(name, s) for s in range(seq, seq + 5)]
            while not stop.is_set():  # retry the same records until acknowledged, as an agent does
                try:
                    if post_records(gw.url, name, batch, timeout=5).status_code == 200:
                        acked[name].extend(r["seq"] for r in batch)
                        break
                except requests.RequestException:
                    pass
                stop.wait(0.05)
            seq += 4

    threads = [threading.Thread(target=robot, args=(name,)) for name in acked]
    for thread in threads:
        thread.start()
    try:
        for cycle in range(50):
            wait_until(lambda: gw.running(), 5, "gateway up")
            stop.wait(rng.uniform(0.05, 0.4))
            gw.kill9()
            with sqlite3.connect(tele.root / "gw-state" / "telemetry.db") as conn:
                assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok", f"cycle {cycle}"
            old_url = gw.url
            gw.start()
            assert gw.url != "" and old_url
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    total = sum(len(v) for v in acked.values())
    wait_until(lambda: sum(1 for r in held(tele) if r[3] == "metric") >= total, 60, f"all {total} acknowledged records")
    rows = held(tele)
    for name, seqs in acked.items():
        got = [r[2] for r in rows if r[0] == name]
        assert set(seqs) <= set(got), f"{name}: acknowledged records missing at the dashboard"
        assert len(got) == len(set(got)), f"{name}: duplicates at the dashboard"
        assert got == sorted(got), f"{name}: out of order"


@pytest.mark.slow
def test_dashboard_kill9_loop_during_flush_keeps_exactly_once(tele):
    """A backlog flushed into a dashboard that is killed (-9) 30 times at random moments."""
    rng = random.Random(7)
    gw = start_gateway(tele, FORWARD_BATCH=50)
    tele.dashboard.stop()
    for start in range(1, 3001, 100):
        for robot in ("r1", "r2"):
            assert post_records(gw.url, robot, [metric(robot, s) for s in range(start, start + 100)]).status_code == 200
    for cycle in range(30):
        tele.dashboard.start()
        threading.Event().wait(rng.uniform(0.05, 0.5))  # the kill lands somewhere in the flush
        tele.dashboard.kill9()
        with sqlite3.connect(tele.db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok", f"cycle {cycle}"
    tele.dashboard.start()
    wait_until(lambda: len(held(tele)) == 6000, 60, "all 6000 records")
    assert_exactly_once_in_order(held(tele), {"r1": 3000, "r2": 3000})
