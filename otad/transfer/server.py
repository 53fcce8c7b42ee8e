"""The threaded HTTP/1.1 server the gateway's edge listener runs on.

Why not the dashboard's WSGI server: robots download hundreds of MiB each, and
the kernel's sendfile(2) moves those bytes without copying them through
Python, which is what lets one small process keep up with nginx. One thread
per connection (stdlib ThreadingHTTPServer) keeps slow clients from blocking
others.

Hostile clients (docs/security.md): a request's line and header section must
arrive within `header_timeout` seconds in all (a client trickling one byte a
second is cut, however steady), the header section is at most 64 KiB (431), a
body must arrive at a minimum average rate, an idle connection is closed after
`idle_timeout`, and at most `max_connections` are open at once (503 beyond).
With an `ssl.SSLContext` every accepted socket is wrapped in TLS in its own
thread (a slow handshake holds no one else up); sendfile then falls back to send.
"""
from __future__ import annotations

import http.client
import io
import json
import logging
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from otad.transfer.http import Plan, Validators, plan_response

log = logging.getLogger("otad.http")

MAX_HEADER_BYTES = 64 * 1024  # the whole header section, all lines together
MIN_BODY_RATE = 16 * 1024  # bytes per second a request body must average
LINGER_SECONDS, LINGER_BYTES = 1.0, 1024 * 1024  # read and dropped after an early answer, at most


@dataclass(frozen=True)
class ServerLimits:
    header_timeout: float = 20.0  # request line + headers, in all
    idle_timeout: float = 60.0  # no byte either way for this long: connection closed
    max_connections: int = 1000

    def body_timeout(self, length: int) -> float:
        return self.header_timeout + length / MIN_BODY_RATE


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 ssl_context: ssl.SSLContext | None = None, limits: ServerLimits | None = None) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.ssl_context = ssl_context
        self.limits = limits or ServerLimits()
        self._open = 0
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def handle_error(self, request, client_address) -> None:
        """One line, not socketserver's traceback: a client that hangs up is not news."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("client %s: %s", client_address[0], type(exc).__name__)
        else:
            log.error("request from %s failed: %s: %s", client_address[0], type(exc).__name__, exc)

    def process_request(self, request, client_address) -> None:
        with self._open_lock:
            full = self._open >= self.limits.max_connections
            if not full:
                self._open += 1
        if full:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._closed()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._closed()

    def _closed(self) -> None:
        with self._open_lock:
            self._open -= 1

    def _refuse(self, request: socket.socket) -> None:
        """Over max_connections: a short 503 (plain HTTP only: TLS would need a handshake), then close."""
        if self.ssl_context is None:
            body = b'{"error": "too many connections, retry later"}\n'
            head = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 5\r\n"
                    b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
            try:
                request.settimeout(0)
                request.send(head + body)
            except OSError:
                pass
        self.shutdown_request(request)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    def start_thread(self, name: str) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.5}, name=name, daemon=True)
        thread.start()
        return thread


class _DeadlineSocket(io.RawIOBase):
    """Socket reads that fail once a deadline has passed, however steadily bytes trickle in."""

    def __init__(self, sock: socket.socket, idle_timeout: float) -> None:
        self._sock = sock
        self._idle = idle_timeout
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("request deadline passed")
            self._sock.settimeout(min(left, self._idle))
        return self._sock.recv_into(buffer)


class _RequestReader(io.BufferedReader):
    """Counts header bytes: parse_headers turns LineTooLong into a 431."""

    header_left: int | None = None

    def readline(self, size: int | None = -1) -> bytes:
        line = super().readline(size)
        if self.header_left is not None:
            self.header_left -= len(line)
            if self.header_left < 0:
                raise http.client.LineTooLong("header section")
        return line


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def version_string(self) -> str:
        return "otad"

    def setup(self) -> None:
        limits = self.server.limits
        self.timeout = limits.idle_timeout
        if self.server.ssl_context is not None:
            self.request = self._handshake(self.request, limits.header_timeout)
        super().setup()
        self.rfile.close()  # the stdlib's plain reader; ours enforces deadlines
        self._raw = _DeadlineSocket(self.connection, limits.idle_timeout)
        self.rfile = _RequestReader(self._raw, 64 * 1024)

    def _handshake(self, sock: socket.socket, timeout: float) -> ssl.SSLSocket:
        sock.settimeout(timeout)
        try:
            wrapped = self.server.ssl_context.wrap_socket(sock, server_side=True)  # type: ignore[union-attr]
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            log.warning("TLS handshake with %s failed: %s", self.client_address[0], reason)
            raise ConnectionAbortedError("TLS handshake failed") from None
        return wrapped

    def handle_one_request(self) -> None:
        # The deadline covers waiting for the request line, too: an idle keep-alive
        # connection is closed after header_timeout, and the client simply reconnects.
        self._raw.deadline = time.monotonic() + self.server.limits.header_timeout
        try:
            super().handle_one_request()
        finally:
            self._raw.deadline = None

    def parse_request(self) -> bool:
        self.rfile.header_left = MAX_HEADER_BYTES
        try:
            return super().parse_request()
        finally:
            self.rfile.header_left = None
            self._raw.deadline = None
            self.connection.settimeout(self.server.limits.idle_timeout)

    def finish(self) -> None:
        try:
            super().finish()
            if self.close_connection:
                self._drain()
        finally:
            if self.server.ssl_context is not None:
                # wrap_socket detached the accepted socket: socketserver's own close no longer reaches it.
                self.connection.close()

    def _drain(self) -> None:
        """A lingering close, as nginx does: after an early answer (401, 413, 431) the client may
        still be sending; closing with unread bytes would send a reset that can destroy our
        answer in the client's buffer. So: end our side, then read and drop a bounded amount."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            deadline, left = time.monotonic() + LINGER_SECONDS, LINGER_BYTES
            while left > 0 and (remaining := deadline - time.monotonic()) > 0:
                self.connection.settimeout(remaining)
                data = self.connection.recv(min(65536, left))
                if not data:
                    return
                left -= len(data)
        except OSError:
            pass

    def read_body(self, length: int) -> bytes:
        """`length` bytes of request body, at no less than MIN_BODY_RATE on average (else TimeoutError)."""
        self._raw.deadline = time.monotonic() + self.server.limits.body_timeout(length)
        try:
            return self.rfile.read(length)
        finally:
            self._raw.deadline = None
            self.connection.settimeout(self.server.limits.idle_timeout)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own errors (400, 414, 431, 501) as JSON, like every other otad error."""
        self.close_connection = True
        if code == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE:
            text = f"request header section too large (at most {MAX_HEADER_BYTES} bytes and 100 fields)"
        else:
            text = (message or HTTPStatus(code).phrase)[:200]
        self.log_error("code %d, message %s", code, text)
        try:
            self.send_error_json(code, text, [("Connection", "close")])
        except OSError:
            pass

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
        """Serve a file with ETag/Range semantics, its body by sendfile(2) (send() under TLS)."""
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
                # send() where sendfile(2) is unavailable (an SSLSocket).
                self.connection.sendfile(stream, plan.start, plan.length)
