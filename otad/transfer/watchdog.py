"""Minimum progress for every HTTP transfer: a server that stalls or trickles is cut.

requests' read timeout applies to each socket read, so a server sending one
byte every READ_TIMEOUT - 1 seconds would hold a download (or the response
headers) forever: the slow-retrieval attack. A `Progress` watches one
transfer from another thread: in every window of `window` seconds (the read
timeout) at least `min_bytes` must arrive, headers included, or it shuts the
connection's socket down, which ends the blocked read at once; the client
then reports "too slow" and keeps what it has for a later resume.

Progress is what the kernel received on the connection's socket
(TCP_INFO `tcpi_bytes_received`, Linux >= 4.1), so it needs no small read
chunks; where that is unavailable, the bytes the client has read (`add`).
The socket is found through urllib3 connection classes that note which
connection the current thread is using (`WatchedAdapter`); this works with
urllib3 1.26 (bookworm) and 2.x alike.
"""
from __future__ import annotations

import socket
import struct
import threading

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_current = threading.local()
_TCPI_BYTES_RECEIVED = 128  # offset of the u64 in struct tcp_info (linux/tcp.h; stable, append-only ABI)


def socket_bytes_received(sock: socket.socket | None) -> int | None:
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except (OSError, ValueError):
        return None
    if len(info) < _TCPI_BYTES_RECEIVED + 8:
        return None
    return struct.unpack_from("Q", info, _TCPI_BYTES_RECEIVED)[0]


def socket_progress_available() -> bool:
    """Whether this kernel reports bytes received per socket (checked once)."""
    global _SOCKET_PROGRESS
    if _SOCKET_PROGRESS is None:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                _SOCKET_PROGRESS = socket_bytes_received(probe) is not None
        except OSError:
            _SOCKET_PROGRESS = False
    return _SOCKET_PROGRESS


_SOCKET_PROGRESS: bool | None = None


class Progress:
    """Context manager around one request: `add(n)` for every n bytes received."""

    def __init__(self, window: float, min_bytes: int, what: str) -> None:
        self.window, self.min_bytes, self.what = window, min_bytes, what
        self.received = 0
        self.tripped: str | None = None  # why the transfer was cut, if it was
        self.connection: HTTPConnection | None = None
        self._base = 0  # the socket's byte count when this request began on it (keep-alive reuse)
        self._done = threading.Event()

    def __enter__(self) -> "Progress":
        _current.progress = self
        if self.window > 0 and self.min_bytes > 0:
            threading.Thread(target=self._watch, name="transfer-watchdog", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        _current.progress = None
        self._done.set()

    def add(self, count: int) -> None:
        self.received += count

    def claim(self, connection: HTTPConnection) -> None:
        self.connection = connection
        self._base = socket_bytes_received(getattr(connection, "sock", None)) or 0

    def progress(self) -> int:
        """Bytes received so far: at the socket if the kernel says, else as read."""
        at_socket = socket_bytes_received(getattr(self.connection, "sock", None))
        return max(self.received, at_socket - self._base if at_socket is not None else 0)

    def _watch(self) -> None:
        seen = 0
        while not self._done.wait(self.window):
            now = self.progress()
            if now - seen < self.min_bytes:
                self.tripped = (f"too slow: {now - seen} bytes in {self.window:g}s, "
                                f"below the minimum of {self.min_bytes} (MIN_RATE)")
                self._cut()
                return
            seen = now

    def _cut(self) -> None:
        sock = getattr(self.connection, "sock", None)
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in recv()
        except OSError:
            pass


def _claim(connection: HTTPConnection) -> None:
    progress = getattr(_current, "progress", None)
    if progress is not None:
        progress.claim(connection)


class _WatchedHTTPConnection(HTTPConnection):
    def request(self, *args, **kwargs):  # type: ignore[override]
        _claim(self)
        return super().request(*args, **kwargs)


class _WatchedHTTPSConnection(HTTPSConnection):
    def request(self, *args, **kwargs):  # type: ignore[override]
        _claim(self)
        return super().request(*args, **kwargs)


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class WatchedAdapter(HTTPAdapter):
    """requests' adapter, with connections a `Progress` can cut."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}
