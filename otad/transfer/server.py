"""The threaded HTTP/1.1 server the gateway's edge listener runs on.

Why not the dashboard's WSGI server: robots download hundreds of MiB each, and
the kernel's sendfile(2) moves those bytes without copying them through
Python, which is what lets one small process keep up with nginx. One thread
per connection (stdlib ThreadingHTTPServer) keeps slow clients from blocking
others; socket timeouts bound how long a silent client holds its thread.
"""
from __future__ import annotations

import json
import logging
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from otad.transfer.http import Plan, Validators, plan_response

log = logging.getLogger("otad.http")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)

    def handle_error(self, request, client_address) -> None:
        """One line, not socketserver's traceback: a client that hangs up is not news."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("client %s: %s", client_address[0], type(exc).__name__)
        else:
            log.error("request from %s failed: %s: %s", client_address[0], type(exc).__name__, exc)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start_thread(self, name: str) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.5}, name=name, daemon=True)
        thread.start()
        return thread


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def version_string(self) -> str:
        return "otad"
    timeout = 60  # an idle or trickling client loses its connection after this

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def send_json(self, status: int, doc: object, extra: list[tuple[str, str]] | None = None) -> None:
        body = (json.dumps(doc) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra or []:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error_json(self, status: int, message: str, extra: list[tuple[str, str]] | None = None) -> None:
        self.send_json(status, {"error": message}, extra)

    def _send_plan_headers(self, plan: Plan, content_type: str) -> None:
        self.send_response(plan.status)
        if plan.status in (200, 206):
            self.send_header("Content-Type", content_type)
        elif plan.status == 416:
            self.send_header("Content-Length", "0")
        for name, value in plan.headers:
            self.send_header(name, value)
        self.end_headers()

    def send_bytes(self, data: bytes, validators: Validators, content_type: str) -> None:
        plan = plan_response(self.command, self.headers, validators)
        self._send_plan_headers(plan, content_type)
        if self.command == "GET" and plan.status in (200, 206):
            self.wfile.write(data[plan.start : plan.start + plan.length])

    def send_file(self, path, validators: Validators, content_type: str) -> None:
        """Serve a file with ETag/Range semantics, its body by sendfile(2)."""
        try:
            stream = open(path, "rb")
        except OSError:
            self.send_error_json(404, "not found")
            return
        with stream:
            plan = plan_response(self.command, self.headers, validators)
            self._send_plan_headers(plan, content_type)
            if self.command == "GET" and plan.status in (200, 206) and plan.length:
                # socket.sendfile honours the socket timeout and falls back to
                # send() where sendfile(2) is unavailable.
                self.connection.sendfile(stream, plan.start, plan.length)
