"""A TCP fault proxy between two real processes: cut after N bytes, stall, refuse, throttle.

Used by `make demo` to take the WAN down on loopback without root (and to give
the site network a finite speed, so a download takes long enough to watch), and
by the tests. It runs in the calling process on 127.0.0.1. It counts the bytes that flow from the
upstream server to the client, so a test can prove a resumed download did not
fetch the file again from the start.
"""
from __future__ import annotations

import select
import socket
import threading
import time


class FaultProxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.downstream_bytes = 0  # upstream -> client, in total
        self.cuts_left = 0
        self.cut_after = 0  # bytes per connection before it is cut, while cuts_left > 0
        self.cuts_done = 0
        self.stalled = threading.Event()
        self.refusing = False
        self.rate: int | None = None  # upstream -> client bytes per second, per connection
        self._closing = False
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    # -- levers ---------------------------------------------------------------------
    def cut_connections(self, count: int, after_bytes: int) -> None:
        with self.lock:
            self.cuts_left, self.cut_after = count, after_bytes

    def throttle(self, bytes_per_second: int | None) -> None:
        """Limit each connection's upstream -> client flow (None: as fast as loopback goes)."""
        self.rate = bytes_per_second

    def stall(self) -> None:
        self.stalled.set()

    def unstall(self) -> None:
        self.stalled.clear()

    def refuse(self, on: bool = True) -> None:
        """Accept and immediately reset every new connection (and drop live ones)."""
        self.refusing = on
        if on:
            self.drop_all()

    def drop_all(self) -> None:
        with self.lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            _close(conn)

    def close(self) -> None:
        self._closing = True
        _close(self.listener)
        self.drop_all()

    # -- plumbing -----------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                _close(client)
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            _close(client)
            return
        with self.lock:
            self._conns += [client, server]
            budget = self.cut_after if self.cuts_left > 0 else None
            if budget is not None:
                self.cuts_left -= 1
        sent = 0
        paced_until = 0.0  # when the bytes sent so far may have left at self.rate
        try:
            while True:
                readable, _, _ = select.select([client, server], [], [], 0.2)
                if self._closing:
                    return
                for sock in readable:
                    data = sock.recv(16384 if self.rate else 65536)
                    if not data:
                        return
                    if sock is server:
                        while self.stalled.is_set() and not self._closing:
                            threading.Event().wait(0.05)  # hold the bytes while stalled
                        if budget is not None and sent + len(data) >= budget:
                            data = data[: budget - sent]
                            client.sendall(data)
                            with self.lock:
                                self.downstream_bytes += len(data)
                                self.cuts_done += 1
                            return
                        client.sendall(data)
                        sent += len(data)
                        paced_until = self._pace(len(data), paced_until)
                        with self.lock:
                            self.downstream_bytes += len(data)
                    else:
                        server.sendall(data)
        except (OSError, ValueError):  # ValueError: select() on a socket close() already shut
            return
        finally:
            _close(client)
            _close(server)

    def _pace(self, size: int, paced_until: float) -> float:
        """Sleep so this connection averages self.rate; idle time earns no burst."""
        rate = self.rate
        if not rate:
            return 0.0
        now = time.monotonic()
        paced_until = max(paced_until, now) + size / rate
        if paced_until > now:
            time.sleep(min(paced_until - now, 1.0))
        return paced_until


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
