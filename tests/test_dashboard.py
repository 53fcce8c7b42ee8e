"""otad-dashboard, OTA half: the real command on loopback, releases published by the real CLI.

One dashboard (`site`) serves the read-only checks; tests that change the OTA
folder or signal the process start their own. The stat fallback is exercised
in a real process too: a `pyinotify` that fails to import is put first on
PYTHONPATH, which is exactly the situation the fallback exists for.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
import requests

from conftest import make_app, otad_release
from harness import Daemon, run_command, wait_until, write_config

BIG = 256 * 1024 * 1024


# -- releases, built once per module with the real CLI ------------------------------


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("releases")
    prefix = root / "release"
    assert otad_release("keygen", "--output-prefix", str(prefix)).returncode == 0
    built = {}
    for version in ("1.0.0", "2.0.0"):
        app = make_app(root / f"app-{version}", version, {"bin/app": f"#!/bin/sh\necho {version}\n".encode() * 50})
        out = root / f"out-{version}"
        result = otad_release("build", "--app-dir", str(app), "--version", version, "--key", str(prefix) + ".key", "--out", str(out))
        assert result.returncode == 0, result.stderr
        built[version] = out
    return built


def publish(out: Path, ota: Path) -> None:
    result = otad_release("publish", "--from", str(out), "--to", str(ota))
    assert result.returncode == 0, result.stderr


def start_dashboard(folder: Path, ota: Path, env: dict[str, str] | None = None) -> Daemon:
    conf = write_config(folder / "dashboard.conf", {"LISTEN": "127.0.0.1:0", "OTA_DIR": ota})
    return Daemon("otad-dashboard", conf, folder / "dashboard.log", env=env).start()


@pytest.fixture
def dashboards():
    started: list[Daemon] = []

    def start(folder: Path, ota: Path, env: dict[str, str] | None = None) -> Daemon:
        started.append(start_dashboard(folder, ota, env))
        return started[-1]

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture(scope="module")
def site(releases, tmp_path_factory):
    """A dashboard with two versions published and some hostile neighbours in its folder."""
    root = tmp_path_factory.mktemp("site")
    ota = root / "ota"
    publish(releases["1.0.0"], ota)
    publish(releases["2.0.0"], ota)
    (root / "secret.txt").write_text("outside the OTA folder\n")
    (ota / ".manifest.json.tmp").write_text("half-written temp file\n")
    (ota / "outside-link").symlink_to(root / "secret.txt")
    with open(ota / "big.bin", "wb") as stream:
        stream.truncate(BIG)
    daemon = start_dashboard(root, ota)
    yield daemon, ota
    daemon.stop()


# -- HTTP helpers: http.client and raw sockets never normalise the path ---------------


def request(url: str, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[http.client.HTTPResponse, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def raw_exchange(url: str, head: str) -> tuple[str, dict[str, str], bytes]:
    """Send one request with Connection: close; return the status line, the headers
    (lower-case names) and every byte the server sent after them."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall((head + "Connection: close\r\n\r\n").encode("latin-1"))
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head_bytes, _, body = received.partition(b"\r\n\r\n")
    status, *lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return status, headers, body


def manifest_version(url: str) -> str | None:
    response = requests.get(url + "/manifest", timeout=5)
    return response.json()["version"] if response.status_code == 200 else None


def assert_json_error(response: http.client.HTTPResponse, body: bytes, status: int) -> dict:
    assert response.status == status, body
    assert response.getheader("Content-Type") == "application/json"
    document = json.loads(body)
    assert list(document) == ["error"] and "\n" not in document["error"]
    return document


# -- the manifest -------------------------------------------------------------------------


def test_both_manifest_urls_serve_the_published_manifest(site):
    daemon, ota = site
    on_disk = (ota / "manifest.json").read_bytes()
    for path in ("/manifest", "/ota/manifest.json"):
        response = requests.get(daemon.url + path, timeout=5)
        assert response.status_code == 200
        assert response.content == on_disk
        assert response.headers["Content-Type"] == "application/json"
        assert response.headers["ETag"].startswith('"') and response.headers["Last-Modified"].endswith("GMT")
        assert response.headers["Accept-Ranges"] == "bytes"


def test_a_poll_with_the_current_etag_is_a_bodyless_304(site):
    daemon, _ = site
    etag = requests.get(daemon.url + "/manifest", timeout=5).headers["ETag"]
    status, headers, body = raw_exchange(daemon.url, f"GET /manifest HTTP/1.1\r\nHost: x\r\nIf-None-Match: {etag}\r\n")
    assert status.startswith("HTTP/1.1 304 ")
    assert headers["etag"] == etag
    assert body == b""
    stale = requests.get(daemon.url + "/manifest", headers={"If-None-Match": '"stale"'}, timeout=5)
    assert stale.status_code == 200 and stale.json()["version"] == "2.0.0"


def test_every_published_version_keeps_its_own_signed_pair(site, releases):
    """A newer publish does not take the older version's manifest away: gateways whose rollout plans
    assign 1.0.0 fetch it by version (GET /releases/<version>/manifest and .bundle), with validators."""
    daemon, ota = site
    for version in ("1.0.0", "2.0.0"):
        for route, name in (("manifest", "manifest.json"), ("manifest.bundle", "manifest.json.bundle")):
            response = requests.get(f"{daemon.url}/releases/{version}/{route}", timeout=5)
            assert response.status_code == 200, response.text
            assert response.content == (releases[version] / name).read_bytes()
            assert response.headers["Content-Type"] == "application/json" and response.headers["ETag"].startswith('"')
            assert (ota / "releases" / version / name).read_bytes() == response.content
    assert requests.get(f"{daemon.url}/manifest", timeout=5).json()["version"] == "2.0.0"  # still the newest
    etag = requests.get(f"{daemon.url}/releases/1.0.0/manifest", timeout=5).headers["ETag"]
    status, headers, body = raw_exchange(daemon.url, f"GET /releases/1.0.0/manifest HTTP/1.1\r\nHost: x\r\nIf-None-Match: {etag}\r\n")
    assert status.startswith("HTTP/1.1 304 ") and body == b""
    response, body = request(daemon.url, "GET", "/releases/3.0.0/manifest")
    assert assert_json_error(response, body, 404) == {"error": "release 3.0.0 is not published here"}
    response, body = request(daemon.url, "POST", "/releases/1.0.0/manifest")
    assert_json_error(response, body, 405)


def test_before_any_publish_the_manifest_is_a_json_404(dashboards, tmp_path):
    daemon = dashboards(tmp_path, tmp_path / "ota-not-created-yet")
    response, body = request(daemon.url, "GET", "/manifest")
    assert assert_json_error(response, body, 404) == {"error": "no release published yet"}
    health = requests.get(daemon.url + "/healthz", timeout=5).json()
    assert health["release"] is None


def watch_env(watch: str, tmp_path: Path) -> dict[str, str] | None:
    """For "stat", an environment in which `import pyinotify` fails, as where inotify is absent."""
    if watch == "inotify":
        return None
    blocker = tmp_path / "no-inotify"
    blocker.mkdir()
    (blocker / "pyinotify.py").write_text("raise ImportError('inotify is not available here')\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))}


@pytest.mark.parametrize("watch", ["inotify", "stat"])
def test_a_new_publish_is_served_without_a_restart(watch, releases, dashboards, tmp_path):
    ota = tmp_path / "ota"
    publish(releases["1.0.0"], ota)
    daemon = dashboards(tmp_path, ota, env=watch_env(watch, tmp_path))
    expected = "(inotify)" if watch == "inotify" else "(a stat check per request)"
    assert expected in daemon.new_log()
    first = requests.get(daemon.url + "/manifest", timeout=5)
    assert first.json()["version"] == "1.0.0"

    publish(releases["2.0.0"], ota)
    wait_until(lambda: manifest_version(daemon.url) == "2.0.0", 10, "the dashboard to serve 2.0.0")
    polled = requests.get(daemon.url + "/manifest", headers={"If-None-Match": first.headers["ETag"]}, timeout=5)
    assert polled.status_code == 200 and polled.content == (ota / "manifest.json").read_bytes()
    assert requests.get(daemon.url + "/healthz", timeout=5).json()["release"] == "2.0.0"


@pytest.mark.parametrize("watch", ["inotify", "stat"])
def test_a_malformed_manifest_is_logged_once_and_the_last_good_one_stays(watch, releases, dashboards, tmp_path):
    ota = tmp_path / "ota"
    publish(releases["1.0.0"], ota)
    daemon = dashboards(tmp_path, ota, env=watch_env(watch, tmp_path))
    good = (ota / "manifest.json").read_bytes()
    broken = json.loads(good)
    del broken["sha256"]
    (ota / ".manifest.json.new").write_text(json.dumps(broken))
    os.replace(ota / ".manifest.json.new", ota / "manifest.json")  # the way publish renames

    for _ in range(5):
        assert requests.get(daemon.url + "/manifest", timeout=5).content == good
    line = daemon.wait_for_log(r"error: ignoring malformed .*manifest\.json: (.*)")
    assert "sha256" in line[1] and "still serving app 1.0.0" in line[1]
    assert requests.get(daemon.url + "/manifest", timeout=5).content == good
    assert daemon.new_log().count("ignoring malformed") == 1
    publish(releases["2.0.0"], ota)  # and the next good publish is picked up
    wait_until(lambda: manifest_version(daemon.url) == "2.0.0", 10, "the dashboard to serve 2.0.0")


# -- files: validators, ranges, HEAD ------------------------------------------------------


def artifact(ota: Path, version: str = "2.0.0") -> tuple[str, bytes]:
    name = f"app-v{version}.tar.gz"
    return name, (ota / name).read_bytes()


def test_a_download_carries_validators_and_the_exact_bytes(site):
    daemon, ota = site
    name, data = artifact(ota)
    response = requests.get(f"{daemon.url}/ota/{name}", timeout=5)
    assert response.status_code == 200 and response.content == data
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["Last-Modified"].endswith("GMT") and response.headers["ETag"]
    assert response.headers["Content-Type"] == "application/gzip"


def test_an_older_version_stays_downloadable(site):
    daemon, ota = site
    name, data = artifact(ota, "1.0.0")
    response = requests.get(f"{daemon.url}/ota/{name}", timeout=5)
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    "range_header, span",
    [("bytes=10-109", (10, 110)), ("bytes=-50", (-50, None)), ("bytes=100-", (100, None))],
    ids=["middle", "suffix", "open-ended"],
)
def test_a_range_gives_206_with_the_right_bytes(site, range_header, span):
    daemon, ota = site
    name, data = artifact(ota)
    response = requests.get(f"{daemon.url}/ota/{name}", headers={"Range": range_header}, timeout=5)
    expected = data[span[0]:span[1]]
    first = span[0] % len(data)
    assert response.status_code == 206
    assert response.content == expected
    assert response.headers["Content-Range"] == f"bytes {first}-{first + len(expected) - 1}/{len(data)}"


@pytest.mark.parametrize("first, last", [(0, 100), (0, None)], ids=["bounded", "open-ended"])
def test_an_unsatisfiable_range_is_416_naming_the_size(site, first, last):
    daemon, ota = site
    name, data = artifact(ota)
    spec = f"bytes={len(data) + first}-" + ("" if last is None else str(len(data) + last))
    response, body = request(daemon.url, "GET", f"/ota/{name}", {"Range": spec})
    assert_json_error(response, body, 416)
    assert response.getheader("Content-Range") == f"bytes */{len(data)}"


def test_if_range_resumes_only_while_the_file_is_unchanged(site):
    daemon, ota = site
    name, data = artifact(ota)
    url = f"{daemon.url}/ota/{name}"
    etag = requests.head(url, timeout=5).headers["ETag"]
    resumed = requests.get(url, headers={"Range": "bytes=100-", "If-Range": etag}, timeout=5)
    assert resumed.status_code == 206 and resumed.content == data[100:]
    changed = requests.get(url, headers={"Range": "bytes=100-", "If-Range": '"0-0"'}, timeout=5)
    assert changed.status_code == 200 and changed.content == data


def test_head_sends_the_headers_and_no_body(site):
    daemon, ota = site
    name, data = artifact(ota)
    status, headers, body = raw_exchange(daemon.url, f"HEAD /ota/{name} HTTP/1.1\r\nHost: x\r\n")
    assert status.startswith("HTTP/1.1 200 ")
    assert headers["content-length"] == str(len(data))
    assert headers["accept-ranges"] == "bytes" and headers["last-modified"].endswith("GMT") and headers["etag"]
    assert body == b""


@pytest.mark.parametrize(
    "path",
    [
        "/ota/../secret.txt",
        "/ota/%2e%2e/secret.txt",
        "/ota/..%2fsecret.txt",
        "/ota/%252e%252e%252fsecret.txt",
        "/ota/..\\secret.txt",
        "/ota/..%5csecret.txt",
        "/ota/%2Fetc%2Fpasswd",
        "/ota//etc/passwd",
        "/ota/.manifest.json.tmp",
        "/ota/outside-link",
        "/ota/",
    ],
)
def test_nothing_outside_the_ota_folder_is_served(site, path):
    daemon, _ = site
    response, body = request(daemon.url, "GET", path)
    assert_json_error(response, body, 404)
    assert b"outside the OTA folder" not in body and b"root:" not in body and b"half-written" not in body


def test_unknown_paths_and_methods_are_json_errors(site):
    daemon, ota = site
    response, body = request(daemon.url, "GET", "/nothing-here")
    assert_json_error(response, body, 404)
    response, body = request(daemon.url, "POST", "/manifest")
    assert_json_error(response, body, 405)
    assert response.getheader("Allow") == "GET, HEAD"
    name, _ = artifact(ota)
    response, body = request(daemon.url, "DELETE", f"/ota/{name}")
    assert_json_error(response, body, 405)
    assert (ota / name).exists()


def test_healthz_reports_the_version_and_release(site):
    daemon, _ = site
    response = requests.get(daemon.url + "/healthz", timeout=5)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["release"] == "2.0.0" and body["version"]


def test_a_256_mib_file_is_streamed_not_loaded(site):
    daemon, _ = site
    received = 0
    with requests.get(daemon.url + "/ota/big.bin", stream=True, timeout=30) as response:
        assert response.status_code == 200 and int(response.headers["Content-Length"]) == BIG
        for chunk in response.iter_content(1 << 20):
            received += len(chunk)
    assert received == BIG
    status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
    peak_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    assert peak_kib < 100 * 1024, f"dashboard peak RSS {peak_kib} KiB while serving {BIG >> 20} MiB"


# -- the process: signals and config ------------------------------------------------------


@pytest.mark.parametrize("span", ["bytes=0-", f"bytes=1-{BIG - 2}"], ids=["to-eof", "middle"])
def test_sigterm_mid_download_exits_0_promptly(releases, dashboards, tmp_path, span):
    ota = tmp_path / "ota"
    publish(releases["1.0.0"], ota)
    with open(ota / "big.bin", "wb") as stream:
        stream.truncate(BIG)
    daemon = dashboards(tmp_path, ota)
    with requests.get(daemon.url + "/ota/big.bin", headers={"Range": span}, stream=True, timeout=10) as response:
        assert response.status_code == 206
        assert len(next(response.iter_content(1 << 20))) > 0
        daemon.signal(signal.SIGTERM)
        assert daemon.stop(timeout=10) == 0
    assert "Traceback" not in daemon.new_log()
    assert "otad-dashboard stopping" in daemon.new_log()


def test_sighup_reloads_the_config_and_switches_ota_dir(releases, dashboards, tmp_path):
    first, second = tmp_path / "ota-1", tmp_path / "ota-2"
    publish(releases["1.0.0"], first)
    publish(releases["2.0.0"], second)
    daemon = dashboards(tmp_path, first)
    assert manifest_version(daemon.url) == "1.0.0"
    write_config(daemon.config, {"LISTEN": "127.0.0.1:1", "OTA_DIR": second})
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log(r"reloaded config")
    assert "LISTEN and THREADS changes take effect when otad-dashboard is restarted" in daemon.new_log()
    assert manifest_version(daemon.url) == "2.0.0"


def test_check_config_names_a_bad_listen_in_one_line(tmp_path):
    conf = write_config(tmp_path / "dashboard.conf", {"LISTEN": "localhost", "OTA_DIR": tmp_path / "ota"})
    result = run_command("otad-dashboard", "--config", str(conf), "--check-config")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "LISTEN" in lines[0], result.stderr
    good = write_config(tmp_path / "good.conf", {"LISTEN": "[::1]:8080", "OTA_DIR": tmp_path / "ota"})
    assert run_command("otad-dashboard", "--config", str(good), "--check-config").returncode == 0


# -- `application` under another WSGI server ----------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


# pyinotify's watcher thread calls Event.isSet(); in-process that warning would land here.
@pytest.mark.filterwarnings("ignore:isSet:DeprecationWarning")
def test_the_wsgi_application_runs_under_another_server(site, monkeypatch, tmp_path):
    """wsgiref instead of waitress: the config comes from $OTAD_DASHBOARD_CONFIG, and a
    middle range sends exactly its bytes even though wsgiref's file_wrapper reads to EOF."""
    import otad.dashboard

    _, ota = site
    conf = write_config(tmp_path / "dashboard.conf", {"OTA_DIR": ota})
    monkeypatch.setenv("OTAD_DASHBOARD_CONFIG", str(conf))
    application = type(otad.dashboard.application)()  # a fresh, not yet configured instance
    server = make_server("127.0.0.1", 0, application, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        name, data = artifact(ota)
        assert requests.get(url + "/manifest", timeout=5).json()["version"] == "2.0.0"
        response, body = request(url, "GET", f"/ota/{name}", {"Range": "bytes=5-24"})
        assert response.status == 206 and body == data[5:25]
        assert requests.get(f"{url}/ota/{name}", timeout=5).content == data
    finally:
        server.shutdown()
        server.server_close()
        application.close()


# -- the status page: robots' text is hostile input ---------------------------------------

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>&amp;'


def test_the_status_page_escapes_what_robots_send(tmp_path, keypair):
    """A self-test's output reaches the page as an event's detail: it must show as text, never as markup."""
    import html

    from fleet import Site, event, metric, post_records, write_tokens

    site = Site(tmp_path, *keypair)
    tokens = write_tokens(tmp_path, ["r1"])
    site.start_dashboard(TOKENS_FILE=tokens["dashboard"])
    try:
        gw = site.gateway(TOKEN_FILE=tokens["gateway_own"], ROBOT_TOKENS_FILE=tokens["robots"]).start()
        records = [metric("r1", 1), {**event("r1", 2, "rolled_back"), "detail": HOSTILE}]
        assert post_records(gw.url, "r1", records).status_code == 200
        doc = wait_until(lambda: (d := requests.get(f"{site.dashboard.url}/status.json", timeout=5).json())["events"] and d,
                         20, "the event at the dashboard")
        assert doc["events"][0]["detail"] == HOSTILE
        page = requests.get(f"{site.dashboard.url}/status", timeout=5)
        assert page.headers["Content-Type"] == "text/html; charset=utf-8"
        assert html.escape(HOSTILE) in page.text
        assert "<script>" not in page.text and "<img" not in page.text
    finally:
        site.stop_all()


def test_status_markup_escapes_every_field_even_ids():
    """Ids are validated at ingest today; the page must not depend on that (another store may not)."""
    import json

    from otad.dashboard.status import render_status, status_document

    bad = '"><svg onload=alert(1)>'
    now = 1_800_000_000.0
    summary = {
        "gateways": [{"gateway_id": bad, "last_seen": now - 5, "backlog": 3, "dropped": 0}],
        "robots": [{"robot_id": bad, "gateway_id": bad, "last_seen": now - 1, "ts": "x", "version": bad, "health": bad,
                    "cpu": 1.0, "mem": 2.0, "boot_id": "b", "last_seq": 1, "records": 1}],
        "events": [{"robot_id": bad, "gateway_id": bad, "ts": bad, "received": now - 2, "type": "event",
                    "body": json.dumps({"event": bad, "version": bad, "detail": bad})}],
        "versions": {bad: 1},
    }
    history = {bad: [{"received": now - 30, "body": json.dumps({"cpu": 50.0, "mem": 20.0})}]}
    page = render_status(status_document(summary, now, history)).decode()
    assert "<svg onload" not in page
    assert page.count("&quot;&gt;&lt;svg onload=alert(1)&gt;") >= 6  # robot, gateway, version, health, event, detail
