"""Telemetry that is acknowledged must be held: restored buffers, dying forwarders, refused records, late backlogs.

Real gateway and dashboard daemons with real SQLite files; the robots are the
test posting records over HTTP, as in tests/test_telemetry.py (whose fixture
and helpers these tests share).
"""
from __future__ import annotations

import json
import logging
import shutil
import signal
import sqlite3
import time

import requests

from fleet import GATEWAY_TOKEN, event, metric, post_records
from harness import wait_until
from notify import NotifySocket
from otad.gateway.buffer import TelemetryBuffer
from test_telemetry import FlakyDashboard, held, start_gateway, tele  # noqa: F401  (tele is a fixture)


def _rfc3339(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def robot_status(site, robot: str) -> dict | None:
    doc = requests.get(f"{site.dashboard.url}/status.json", timeout=5).json()
    return next((r for r in doc["robots"] if r["robot_id"] == robot), None)


def gateway_status(site, gateway: str) -> dict | None:
    doc = requests.get(f"{site.dashboard.url}/status.json", timeout=5).json()
    return next((g for g in doc["gateways"] if g["gateway_id"] == gateway), None)


def gateway_db(site, name: str = "gw"):
    return site.root / f"{name}-state" / "telemetry.db"


# -- item 2: a restored or cloned buffer reuses row ids ------------------------------------

def test_a_restored_gateway_buffer_loses_nothing(tele):
    """The buffer is restored from a backup taken before 5 rows were forwarded: its ids are reused."""
    gw = start_gateway(tele)
    gw.stop()
    backup = tele.root / "backup"
    backup.mkdir()
    for path in gateway_db(tele).parent.glob("telemetry.db*"):
        shutil.copy2(path, backup / path.name)
    gw.start()
    assert post_records(gw.url, "r1", [metric("r1", s) for s in range(1, 6)]).status_code == 200
    wait_until(lambda: len(held(tele)) == 5, 15, "r1's 5 records at the dashboard")
    gw.stop()
    for path in gateway_db(tele).parent.glob("telemetry.db*"):
        path.unlink()
    for path in backup.iterdir():
        shutil.copy2(path, gateway_db(tele).parent / path.name)
    gw.start()
    assert post_records(gw.url, "r2", [metric("r2", s) for s in range(1, 6)]).json() == {"accepted": 5, "duplicates": 0, "refused": 0}
    wait_until(lambda: sum(1 for r in held(tele) if r[0] == "r2") == 5, 20, "r2's 5 new records stored, not just acknowledged")
    gw.wait_for_log(r"telemetry: .*buffer.*reused.*new buffer_id")
    assert sorted(r[2] for r in held(tele) if r[0] == "r1") == [1, 2, 3, 4, 5]


def test_a_buffer_opened_on_another_machine_takes_a_new_buffer_id(tmp_path, caplog):
    """The real TelemetryBuffer module: a cloned image cannot be booted in a test, so the machine id
    of the image's builder is written into the buffer's meta table, where the builder's gateway left it."""
    path = tmp_path / "telemetry.db"

    def open_buffer() -> str:
        buffer = TelemetryBuffer(path, 64 * 2**20)
        buffer.start()
        buffer.close()
        return buffer.buffer_id

    first = open_buffer()
    assert open_buffer() == first  # the same machine: the same buffer
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = 'the-image-builders-machine-id' WHERE key = 'machine_id'")
    with caplog.at_level(logging.WARNING, logger="otad.gateway"):
        cloned = open_buffer()
    assert cloned != first and "made on another machine" in caplog.text
    assert open_buffer() == cloned


def test_the_dashboard_refuses_a_reused_row_id_with_different_content(tele):
    headers = {"Authorization": f"Bearer {GATEWAY_TOKEN}"}

    def send(records):
        payload = {"gateway_id": "gw", "buffer_id": "abc123", "backlog": 0,
                   "records": [{"id": i, "received": 1.0, "record": r} for i, r in records]}
        return requests.post(f"{tele.dashboard.url}/metrics", json=payload, headers=headers, timeout=10)

    assert send([(1, metric("r1", 1)), (2, metric("r1", 2))]).json() == {"acked": 2}
    assert send([(1, metric("r1", 1)), (2, metric("r1", 2))]).json() == {"acked": 2}  # a replay: held, same content
    refused = send([(2, metric("r1", 2)), (3, metric("r2", 1)), (1, metric("r2", 2))])
    assert refused.status_code == 409
    body = refused.json()
    assert body["conflict"] == "buffer_reused" and "new buffer_id" in body["error"]
    assert [r[:3] for r in held(tele)] == [("r1", "boot-1", 1), ("r1", "boot-1", 2)]  # nothing of the refused batch


# -- item 3: a worker thread that raises ----------------------------------------------------

def test_the_forwarder_survives_a_locked_buffer_and_says_so(tele, tmp_path):
    """acknowledge() raises after the buffer stayed locked for 30 s; the forwarder must go on."""
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        gw = start_gateway(tele, env={"NOTIFY_SOCKET": notify.path})
        tele.dashboard.stop()
        assert post_records(gw.url, "r1", [metric("r1", s) for s in (1, 2, 3)]).status_code == 200
        gw.wait_for_log("telemetry: forwarding failed, buffering")
        lock = sqlite3.connect(gateway_db(tele), timeout=5, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # another writer holds the buffer, e.g. a backup tool
        try:
            tele.dashboard.start()
            wait_until(lambda: len(held(tele)) == 3, 20, "the batch at the dashboard")
            gw.wait_for_log("telemetry commit failed", timeout=60)  # the acknowledgement could not be written
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert post_records(gw.url, "r1", [metric("r1", s) for s in (4, 5)]).status_code == 200
        wait_until(lambda: len(held(tele)) == 5, 30, "the records posted after the failure")
        wait_until(lambda: _rows(gateway_db(tele)) == 0, 30, "the gateway's buffer drained")
        gw.wait_for_log(r"forwarder failed: \w+Error: .*; starting it again in")
        wait_until(lambda: any("STATUS=" in m and "forwarder failed" in m for m in notify.drain()), 10,
                   "STATUS= naming the failed forwarder")
        assert gw.running()
    finally:
        notify.close()


def _rows(db) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        return conn.execute("SELECT count(*) FROM records").fetchone()[0]


# -- item 6: a refused record must not block the site ---------------------------------------

def test_a_record_the_dashboard_refuses_is_quarantined_and_the_rest_flows(tele, tmp_path):
    """A row the dashboard does not know (a newer gateway's event type) sits in the buffer
    ahead of good ones; it is written into the buffer directly, as a newer version would have."""
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        gw = start_gateway(tele, env={"NOTIFY_SOCKET": notify.path})
        tele.dashboard.stop()
        assert post_records(gw.url, "r1", [metric("r1", 1)]).status_code == 200
        future = {**event("r1", 2), "event": "calibrated"}
        with sqlite3.connect(gateway_db(tele), timeout=30) as conn:
            conn.execute("INSERT INTO records (robot_id, boot_id, seq, kind, received, body) VALUES ('r1','boot-1',2,'event',?,?)",
                         (time.time(), json.dumps(future, sort_keys=True)))
        assert post_records(gw.url, "r1", [metric("r1", s) for s in (3, 4, 5)]).status_code == 200
        tele.dashboard.start()
        wait_until(lambda: [r[2] for r in held(tele)] == [1, 3, 4, 5], 30, "every record but the refused one")
        gw.wait_for_log(r"quarantined .*unknown event 'calibrated'")
        with sqlite3.connect(gateway_db(tele), timeout=30) as conn:
            kept = conn.execute("SELECT body, reason FROM quarantine").fetchall()
        assert len(kept) == 1 and json.loads(kept[0][0]) == future and "calibrated" in kept[0][1]
        wait_until(lambda: any("STATUS=" in m and "1 quarantined" in m for m in notify.drain()), 10, "STATUS= counting it")
        assert post_records(gw.url, "r1", [metric("r1", 6)]).status_code == 200  # the next one reports the count
        wait_until(lambda: (gateway_status(tele, "gw") or {}).get("quarantined") == 1, 15, "/status.json counting it")
    finally:
        notify.close()


def test_a_batch_over_the_dashboards_size_limit_is_split(tele):
    """875 records of ~24 KB of JSON each: one 1000-row batch would inflate past the dashboard's 16 MiB."""
    gw = start_gateway(tele, FORWARD_BATCH=1000)
    tele.dashboard.stop()
    detail = "\U0001F916" * 2000  # 12 bytes of JSON per character
    seq = 0
    for _ in range(25):
        records = []
        for _ in range(35):
            seq += 1
            records.append({**event("r1", seq), "detail": detail})
        assert post_records(gw.url, "r1", records, timeout=30).status_code == 200
    tele.dashboard.start()
    wait_until(lambda: len(held(tele)) == seq, 60, f"all {seq} large records")
    assert [r[2] for r in held(tele)] == list(range(1, seq + 1))
    assert "413" not in gw.log()


# -- item 4: the robot's latest state moves only forward --------------------------------------

def test_a_late_backlog_from_another_site_does_not_roll_the_robot_back(tele):
    """r1 reports at site A while A's WAN is down, moves to site B, reports there; A's backlog lands last."""
    (tele.root / "gateway-tokens").write_text(f"gw {GATEWAY_TOKEN}\ngwb gateway-token-b-0123456789\n")
    own_b = tele.root / "gwb.token"
    own_b.write_text("gateway-token-b-0123456789\n")
    own_b.chmod(0o600)
    tele.dashboard.signal(signal.SIGHUP)  # SIGHUP: the dashboard reads the new token file
    tele.dashboard.wait_for_log("reloaded config")
    flaky = FlakyDashboard(tele.dashboard.url)  # "500": site A's WAN is down
    try:
        site_a = start_gateway(tele, dashboard_url=flaky.url)
        site_b = tele.gateway(name="gwb", TOKEN_FILE=own_b, ROBOT_TOKENS_FILE=tele.tokens["robots"]).start()
        now = time.time()
        old = [{**metric("r1", s), "ts": _rfc3339(now - 300 + s), "version": "1.0.0", "health": "failed"} for s in (1, 2, 3)]
        new = [{**metric("r1", s), "ts": _rfc3339(now - 10 + s), "version": "2.0.0", "health": "ok"} for s in (4, 5)]
        assert post_records(site_a.url, "r1", old).status_code == 200
        wait_until(lambda: flaky.failures >= 1, 15, "site A failing to forward")
        assert post_records(site_b.url, "r1", new).status_code == 200
        wait_until(lambda: (robot_status(tele, "r1") or {}).get("last_seq") == 5, 15, "site B's records")
        flaky.mode = "pass"
        wait_until(lambda: len(held(tele)) == 5, 30, "site A's backlog")
        robot = robot_status(tele, "r1")
        assert (robot["gateway_id"], robot["version"], robot["health"], robot["last_seq"], robot["records"]) == ("gwb", "2.0.0", "ok", 5, 5)
        assert abs(robot["last_seen"] - (now - 5)) <= 1.5
    finally:
        flaky.close()


def test_a_robot_that_went_quiet_during_an_outage_is_not_shown_alive_when_its_backlog_lands(tele):
    gw = start_gateway(tele)
    tele.dashboard.stop()
    reported = time.time() - 600
    assert post_records(gw.url, "r1", [{**metric("r1", 1), "ts": _rfc3339(reported)}]).status_code == 200
    tele.dashboard.start()
    wait_until(lambda: len(held(tele)) == 1, 30, "the backlog")
    robot = robot_status(tele, "r1")
    assert robot["state"] == "silent" and robot["age_s"] >= 590


# -- also: an index no query uses --------------------------------------------------------------

def test_the_dashboard_store_has_no_unused_robot_index(tele):
    gw = start_gateway(tele)
    assert post_records(gw.url, "r1", [metric("r1", 1)]).status_code == 200
    wait_until(lambda: len(held(tele)) == 1, 15, "one record")
    with sqlite3.connect(f"file:{tele.db}?mode=ro", uri=True, timeout=30) as conn:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "records_robot" not in names and "records_identity" in names
