"""Slow retrieval and endless data against the real gateway and robot.

A real slow link (FaultProxy's throttle) and small hostile servers written here
(trickling headers, bodies that do not end). Every download is capped by the
signed manifest's size, small documents by their fixed caps, and every transfer
must keep MIN_RATE over each READ_TIMEOUT window: a daemon cuts it, says why in one
line, keeps what it has and goes on.
"""
from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


from fleet import fetch_release, wait_for_version
from otad.demo.faultproxy import FaultProxy

MAX_HOSTILE_BYTES = 8 * 1024 * 1024  # the endless servers give up after this much, whatever happens
MAX_TRICKLE_S = 30


class Hostile:
    """An HTTP server whose answers are functions: (handler) -> None."""

    def __init__(self, routes) -> None:
        self.stopping = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                if route is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                try:
                    route(self, outer.stopping)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def exact(data: bytes):
    def answer(handler, stopping) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("ETag", '"fixed"')
        handler.end_headers()
        handler.wfile.write(data)
    return answer


def endless(handler, stopping) -> None:
    """A body with no Content-Length that goes on and on (bounded at MAX_HOSTILE_BYTES)."""
    handler.send_response(200)
    handler.send_header("Connection", "close")
    handler.end_headers()
    sent = 0
    while sent < MAX_HOSTILE_BYTES and not stopping.is_set():
        handler.wfile.write(b" " * 65536)
        sent += 65536


def trickled_headers(handler, stopping) -> None:
    """A status line, then one header byte every 0.2 s: never a complete header section."""
    handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
    deadline = time.monotonic() + MAX_TRICKLE_S
    while time.monotonic() < deadline and not stopping.wait(0.2):
        handler.wfile.write(b"X")
        handler.wfile.flush()


def test_a_link_below_min_rate_is_cut_and_the_download_resumes_when_it_recovers(site):
    size = 512 * 1024
    manifest = site.release("1.0.0", size=size)
    proxy = FaultProxy(("127.0.0.1", int(site.dashboard.url.rsplit(":", 1)[1])))
    try:
        # FaultProxy paces 16 KiB reads with sleeps of at most 1 s: about 16 KiB/s here, well below
        # a MIN_RATE of 64 KiB/s (the manifest and bundle still get through in one window).
        proxy.throttle(1500)
        gw = site.gateway(dashboard_url=proxy.url, READ_TIMEOUT=5, MIN_RATE=65536).start()
        gw.wait_for_log("downloading app 1.0.0")
        line = gw.wait_for_log(r"sync failed, retrying in \d+s: (GET \S+app-v1\.0\.0\.tar\.gz: too slow: .*)", timeout=20)[1]
        assert "in 5s, below the minimum of 245760 (MIN_RATE)" in line, line
        part = site.root / "gw-state" / "cache" / "partial" / "app-v1.0.0.tar.gz.part"
        assert part.exists() and 0 < part.stat().st_size < size  # kept for the resume
        proxy.throttle(None)
        wait_for_version(gw.url, "1.0.0", timeout=30)
        fetch_release(gw.url, manifest)
        assert proxy.downstream_bytes < 1.3 * size  # resumed, not fetched again
        assert gw.running()
    finally:
        proxy.close()


def test_trickled_response_headers_are_cut(site):
    """One header byte every 0.2 s would beat any per-read timeout; the minimum-progress rule does not."""
    server = Hostile({"/manifest": trickled_headers})
    try:
        robot = site.robot(server.url, READ_TIMEOUT=2).start(wait_listening=False)
        started = time.monotonic()
        line = robot.wait_for_log(r"gateway unreachable, retrying in \d+s: (.*)", timeout=15)[1]
        assert line.startswith(f"GET {server.url}/manifest: too slow: ") and "MIN_RATE" in line, line
        assert time.monotonic() - started < 10
        assert robot.running()
    finally:
        server.close()


def test_endless_manifest_and_endless_artifact_are_capped(site):
    out = site.build("1.0.0")
    files = {name: (out / name).read_bytes() for name in ("manifest.json", "manifest.json.bundle", "app-v1.0.0.sha256")}
    server = Hostile({"/manifest": endless})
    try:
        gw = site.gateway(dashboard_url=server.url).start()
        line = gw.wait_for_log(r"sync failed, retrying in \d+s: (.*)", timeout=15)[1]
        assert line == "refused the dashboard's answer: /manifest is larger than 65536 bytes", line
    finally:
        server.close()
    # A genuine, signed manifest, and an artifact that does not stop at its size.
    server = Hostile({"/manifest": exact(files["manifest.json"]), "/manifest.bundle": exact(files["manifest.json.bundle"]),
                      "/ota/app-v1.0.0.sha256": exact(files["app-v1.0.0.sha256"]),
                      "/ota/app-v1.0.0.tar.gz.bundle": exact((out / "app-v1.0.0.tar.gz.bundle").read_bytes()),
                      "/ota/app-v1.0.0.tar.gz": endless})
    try:
        gw2 = site.gateway(dashboard_url=server.url, name="gw2").start()
        line = gw2.wait_for_log(r"rejected app 1\.0\.0: (.*)", timeout=20)[1]
        size = len((out / "app-v1.0.0.tar.gz").read_bytes())
        assert line == f"{server.url}/ota/app-v1.0.0.tar.gz sent more than the manifest's {size} bytes", line
        partial = site.root / "gw2-state" / "cache" / "partial"
        assert not any(partial.iterdir())  # nothing hostile left on disk
        assert gw2.running()
    finally:
        server.close()


def test_raw_socket_server_that_accepts_and_says_nothing(site):
    """Connected but silent: READ_TIMEOUT alone bounds it (no byte ever arrives)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        robot = site.robot(url, READ_TIMEOUT=2).start(wait_listening=False)
        line = robot.wait_for_log(r"gateway unreachable, retrying in \d+s: (.*)", timeout=15)[1]
        assert line.startswith(f"GET {url}/manifest: "), line
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        for conn in accepted:
            conn.close()
