"""Hostile HTTP bodies and authentication, against the real gateway and dashboard.

The bodies are tests/corpus/http/ with their expected answers in
tests/corpus/http-cases.json (see tests/corpus/README.md). Each is posted to
the real daemon; the answer must be the expected 4xx with a one-line JSON
error, nothing may be stored, and the daemon must keep serving. The request
paths of tests/corpus/path-cases.json go to the dashboard's per-version routes
(/releases/<version>/...) the same way. Then: every
write endpoint wants a token, tokens never reach a log, token files others
can read are refused, and tokens rotate without downtime (SIGHUP).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
from pathlib import Path

import pytest
import requests

from conftest import otad_release
from fleet import GATEWAY_TOKEN, ROBOT_TOKEN, Site, dashboard_records, metric, post_records, robot_token, write_tokens
from harness import run_command, wait_until, write_config

CORPUS = Path(__file__).parent / "corpus"
HTTP_CASES = json.loads((CORPUS / "http-cases.json").read_text())
PATH_CASES = json.loads((CORPUS / "path-cases.json").read_text())


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A dashboard and a gateway with token files; the gateway does not forward (its buffer is inspected)."""
    root = tmp_path_factory.mktemp("hostile-http")
    prefix = root / "release"
    assert otad_release("keygen", "--output-prefix", str(prefix)).returncode == 0
    site = Site(root, prefix.with_suffix(".key"), prefix.with_suffix(".pub"))
    site.tokens = write_tokens(root, ["r1", "r2"])
    site.start_dashboard(TOKENS_FILE=site.tokens["dashboard"])
    site.gw = site.gateway(ROBOT_TOKENS_FILE=site.tokens["robots"]).start()
    yield site
    site.stop_all()


def gateway_ever_stored(site: Site) -> int:
    """Rows ever written to the gateway's buffer (AUTOINCREMENT remembers even deleted ones)."""
    db = site.root / "gw-state" / "telemetry.db"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
        return row[0] if row else 0
    except sqlite3.OperationalError:  # no sqlite_sequence yet: nothing ever inserted
        return 0
    finally:
        conn.close()


def dashboard_held(site: Site) -> int:
    db = site.root / "dashboard-state" / "telemetry.db"
    return len(dashboard_records(db)) if db.exists() else 0


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c["id"] for c in HTTP_CASES])
def test_hostile_body_is_refused_with_a_json_error(pair, case):
    daemon = pair.gw if case["target"] == "gateway" else pair.dashboard
    token = robot_token("r1") if case["target"] == "gateway" else GATEWAY_TOKEN
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json", **case["headers"]}
    body = (CORPUS / case["file"]).read_bytes()
    response = requests.post(f"{daemon.url}/metrics", data=body, headers={k: v for k, v in headers.items() if v}, timeout=30)
    assert response.status_code == case["status"], response.text[:300]
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert case["expect"] in error and "\n" not in error, error
    assert gateway_ever_stored(pair) == 0 and dashboard_held(pair) == 0
    assert requests.get(f"{daemon.url}/healthz", timeout=5).json()["status"] == "ok"
    assert daemon.running() and "Traceback" not in daemon.log()


@pytest.fixture(scope="module")
def published(pair):
    """1.0.0 published into the pair's OTA folder, and a file beside the folder a traversal would reach."""
    pair.release("1.0.0")
    (pair.root / "secret.txt").write_text("outside the OTA folder\n")
    wait_until(lambda: requests.get(f"{pair.dashboard.url}/releases/1.0.0/manifest", timeout=5).status_code == 200, 10,
               "the kept pair of 1.0.0 to be served")
    return pair


@pytest.mark.parametrize("case", PATH_CASES, ids=[c["id"] for c in PATH_CASES])
def test_hostile_release_paths_are_refused_with_a_json_error(published, case):
    """http.client sends the path as it is (no normalisation), as an attacker would."""
    import http.client

    host, port = published.dashboard.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", case["path"])
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status == case["status"], body[:300]
    assert response.getheader("Content-Type") == "application/json"
    document = json.loads(body)
    assert list(document) == ["error"] and case["expect"] in document["error"] and "\n" not in document["error"]
    assert len(document["error"]) < 200 and b"outside the OTA folder" not in body
    assert requests.get(f"{published.dashboard.url}/releases/1.0.0/manifest", timeout=5).status_code == 200
    assert published.dashboard.running() and "Traceback" not in published.dashboard.log()


def test_a_body_without_content_length_is_411(pair):
    host, port = pair.gw.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {robot_token('r1')}\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 411 ") and b'"error"' in answer
    assert gateway_ever_stored(pair) == 0


WRITE_METHODS = ["POST", "PUT", "DELETE", "PATCH"]
ROUTES = ["/", "/manifest", "/manifest.bundle", "/ota/manifest.json", "/ota/app-v1.0.0.tar.gz", "/healthz", "/status",
          "/status.json", "/metrics"]


@pytest.mark.parametrize("server", ["gateway", "dashboard"])
def test_every_write_endpoint_needs_a_token(pair, server):
    """An audit: no method but GET/HEAD does anything without a token, on any route of either server."""
    daemon = pair.gw if server == "gateway" else pair.dashboard
    for method in WRITE_METHODS:
        for route in ROUTES:
            response = requests.request(method, daemon.url + route, data=b"{}", timeout=10)
            if route == "/metrics" and method == "POST":
                assert response.status_code == 401, (method, route)
                assert response.headers["WWW-Authenticate"] == "Bearer"
            else:
                assert response.status_code in (404, 405), (method, route, response.status_code)
            assert response.json()["error"], (method, route)
    assert gateway_ever_stored(pair) == 0 and dashboard_held(pair) == 0


def all_logs(site: Site) -> str:
    return "".join(p.read_text(errors="replace") for p in site.root.glob("*.log"))


def test_tokens_never_reach_a_log(tmp_path, keypair):
    """Bad and good requests, a reload, forwarding, with --debug logging: no token text in any log."""
    key, pub = keypair
    site = Site(tmp_path, key, pub)
    tokens = write_tokens(tmp_path, ["r1", "robot"])
    site.start_dashboard(TOKENS_FILE=tokens["dashboard"])
    try:
        site.dashboard.stop()
        site.dashboard.args = ["--debug"]
        site.dashboard.start()
        gw = site.gateway(TOKEN_FILE=tokens["gateway_own"], ROBOT_TOKENS_FILE=tokens["robots"])
        gw.args = ["--debug"]
        gw.start()
        guessed = "guessed-token-that-is-wrong-0001"
        assert requests.post(f"{gw.url}/metrics", json={"records": [metric("r1", 1)]}, timeout=10,
                             headers={"Authorization": f"Bearer {guessed}"}).status_code == 401
        assert requests.post(f"{site.dashboard.url}/metrics", json={}, timeout=10,
                             headers={"Authorization": f"Bearer {guessed}"}).status_code == 401
        assert requests.post(f"{gw.url}/metrics", json={"records": [metric("r2", 1)]}, timeout=10,
                             headers={"Authorization": f"Bearer {robot_token('r1')}"}).status_code == 403
        assert post_records(gw.url, "r1", [metric("r1", 1), metric("r1", 2)]).status_code == 200
        agent = site.agent(gw.url, name="robot", token_file=None).start(wait_listening=False)
        db = tmp_path / "dashboard-state" / "telemetry.db"
        wait_until(lambda: db.exists() and {r[0] for r in dashboard_records(db)} >= {"r1", "robot"}, 30,
                   "records of r1 and the agent at the dashboard")
        gw.signal(signal.SIGHUP)
        gw.wait_for_log("reloaded config")
        agent.signal(signal.SIGHUP)
        agent.wait_for_log("reloaded config")
        logs = all_logs(site)
        assert "debug" in logs.lower() or "POST /metrics" in logs  # the logs really were verbose
        for secret in (guessed, GATEWAY_TOKEN, robot_token("r1"), robot_token("robot"), ROBOT_TOKEN):
            assert secret not in logs, f"a token appears in a log: {secret[:6]}..."
    finally:
        site.stop_all()


def test_tokens_rotate_without_downtime(tmp_path, keypair):
    """Old and new token valid together; switch the sender; drop the old one. No request refused meanwhile."""
    key, pub = keypair
    site = Site(tmp_path, key, pub)
    tokens = write_tokens(tmp_path, ["r1"])
    site.start_dashboard(TOKENS_FILE=tokens["dashboard"])
    try:
        gw = site.gateway(TOKEN_FILE=tokens["gateway_own"], ROBOT_TOKENS_FILE=tokens["robots"]).start()
        old, new = robot_token("r1"), "r1-new-token-abcdefghijklmnop"
        seq = iter(range(1, 1000))

        def post(token: str) -> int:
            return requests.post(f"{gw.url}/metrics", json={"records": [metric("r1", next(seq))]}, timeout=10,
                                 headers={"Authorization": f"Bearer {token}"}).status_code

        assert post(old) == 200
        # 1. the receiving side accepts both
        tokens["robots"].write_text(f"r1 {old}\nr1 {new}\n")
        gw.signal(signal.SIGHUP)
        gw.wait_for_log("reloaded config")
        assert post(old) == 200 and post(new) == 200
        # 2. the gateway's own token towards the dashboard, the same way
        new_gw = "gateway-new-token-abcdefghijkl"
        tokens["dashboard"].write_text(f"gw {GATEWAY_TOKEN}\ngw {new_gw}\n")
        site.dashboard.signal(signal.SIGHUP)
        site.dashboard.wait_for_log("reloaded config")
        tokens["gateway_own"].write_text(new_gw + "\n")
        gw.signal(signal.SIGHUP)
        wait_until(lambda: gw.new_log().count("reloaded config") >= 2, 10, "the gateway's second reload")
        # 3. the old ones go
        tokens["robots"].write_text(f"r1 {new}\n")
        tokens["dashboard"].write_text(f"gw {new_gw}\n")
        gw.signal(signal.SIGHUP)
        site.dashboard.signal(signal.SIGHUP)
        wait_until(lambda: gw.new_log().count("reloaded config") >= 3, 10, "the gateway's third reload")
        site.dashboard.wait_for_log("reloaded config")
        wait_until(lambda: site.dashboard.new_log().count("reloaded config") >= 2, 10, "the dashboard's second reload")
        assert post(old) == 401
        assert post(new) == 200
        sent = next(seq) - 1
        accepted = sent - 1  # all but the one refused old token
        db = tmp_path / "dashboard-state" / "telemetry.db"
        wait_until(lambda: db.exists() and len(dashboard_records(db)) == accepted, 30, f"all {accepted} accepted records forwarded")
        assert "telemetry: forwarding failed" not in gw.log()  # the gateway's token switch cost no batch
    finally:
        site.stop_all()


@pytest.mark.parametrize("daemon", ["gateway", "dashboard", "telemetry-agent"])
def test_a_token_file_every_user_can_read_is_refused(tmp_path, keypair, daemon):
    pub = keypair[1]
    tokens = write_tokens(tmp_path, ["r1"])
    exposed = {"gateway": tokens["robots"], "dashboard": tokens["dashboard"], "telemetry-agent": tmp_path / "agent.token"}[daemon]
    exposed.write_text(robot_token("r1") + "\n") if daemon == "telemetry-agent" else None
    exposed.chmod(0o644)
    if daemon == "gateway":
        conf = write_config(tmp_path / "gw.conf", {"DASHBOARD_URL": "http://127.0.0.1:1", "TRUSTED_KEYS": pub,
                                                  "LISTEN": "127.0.0.1:0", "STATE_DIR": tmp_path / "s", "ROBOT_TOKENS_FILE": exposed})
    elif daemon == "dashboard":
        conf = write_config(tmp_path / "d.conf", {"LISTEN": "127.0.0.1:0", "OTA_DIR": tmp_path / "ota",
                                                 "STATE_DIR": tmp_path / "s", "TOKENS_FILE": exposed})
    else:
        conf = write_config(tmp_path / "a.conf", {"GATEWAY_URL": "http://127.0.0.1:1", "ROBOT_ID": "r1", "TOKEN_FILE": exposed,
                                                 "STATE_DIR": tmp_path / "s", "APP_DIR": tmp_path / "app",
                                                 "ROBOT_STATE_DIR": tmp_path / "rs"})
    command = {"gateway": "otad-gateway", "dashboard": "otad-dashboard", "telemetry-agent": "telemetry-agent"}[daemon]
    result = run_command(command, "--config", str(conf), timeout=30)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert any(f"{exposed}: token file is readable or writable by every user (mode 0644); chmod 600" in line for line in lines), result.stderr
    assert "Traceback" not in result.stderr
    assert robot_token("r1") not in result.stderr and GATEWAY_TOKEN not in result.stderr


def test_an_exposed_token_file_on_reload_keeps_the_old_tokens(tmp_path, keypair):
    key, pub = keypair
    site = Site(tmp_path, key, pub)
    robots = write_tokens(tmp_path, ["r1", "r2"])["robots"]
    gw = site.gateway(dashboard_url="http://127.0.0.1:1", ROBOT_TOKENS_FILE=robots).start()
    before = robots.read_text()
    try:
        robots.write_text(before + "r3 r3-token-that-is-long-enough\n")
        robots.chmod(0o644)
        gw.signal(signal.SIGHUP)
        gw.wait_for_log(r"keeping the previous tokens: .*token file is readable or writable by every user")
        assert post_records(gw.url, "r2", [metric("r2", 5)]).status_code == 200  # old table still in force
        assert requests.post(f"{gw.url}/metrics", json={"records": [metric("r3", 1)]}, timeout=10,
                             headers={"Authorization": "Bearer r3-token-that-is-long-enough"}).status_code == 401
    finally:
        site.stop_all()


def test_a_group_readable_token_file_gets_a_warning(tmp_path, keypair):
    key, pub = keypair
    site = Site(tmp_path, key, pub)
    tokens = write_tokens(tmp_path, ["r1"])
    tokens["robots"].chmod(0o640)
    other_group = 1 if os.getegid() != 1 else 2
    os.chown(tokens["robots"], -1, other_group)
    try:
        gw = site.gateway(dashboard_url="http://127.0.0.1:1", ROBOT_TOKENS_FILE=tokens["robots"]).start()
        gw.wait_for_log(rf"warning: {tokens['robots']} is readable by group {other_group}, not only by this daemon; chmod 600 it")
        assert post_records(gw.url, "r1", [metric("r1", 1)]).status_code == 200
    finally:
        site.stop_all()


def test_token_lookup_compares_every_entry_in_full(monkeypatch):
    """No early exit and equal-length operands: a lookup's time says nothing about the token.
    (Timing itself is not measured in tests; this checks the construction that makes it flat.)"""
    import hmac

    from otad.telemetry import tokens

    calls: list[tuple[int, int]] = []
    original = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return original(a, b)

    monkeypatch.setattr(tokens.hmac, "compare_digest", counting)
    table = tokens.TokenTable([(f"r{i}", f"token-{i:02d}-" + "x" * (16 + i)) for i in range(10)])
    for presented, expected in (("token-00-" + "x" * 16, "r0"), ("token-09-" + "x" * 25, "r9"), ("wrong", None), ("", None)):
        calls.clear()
        assert table.identify(presented) == expected
        assert calls == [(32, 32)] * 10, presented
