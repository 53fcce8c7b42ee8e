"""sd_notify for every otad daemon: readiness, watchdog, status, stopping.

A no-op outside systemd (no NOTIFY_SOCKET). Uses python3-sdnotify, which
handles abstract socket names and never raises. The socket is made
non-blocking: a reader that stops reading (the kernel queues only
net.unix.max_dgram_qlen datagrams) must cost a lost STATUS line, never a main
loop stuck in send() that no longer answers SIGTERM.
"""
from __future__ import annotations

import os
import time

import sdnotify


class Notifier:
    def __init__(self) -> None:
        self._enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._sd = sdnotify.SystemdNotifier() if self._enabled else None
        if self._sd is not None and self._sd.socket is not None:
            self._sd.socket.setblocking(False)
        self._last_status = ""
        self.watchdog_interval = _watchdog_interval()
        self._next_ping = 0.0

    def _send(self, message: str) -> None:
        if self._sd is not None:
            self._sd.notify(message)

    def ready(self, status: str) -> None:
        self._last_status = status
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self._send(f"STATUS={status}")

    def reloading(self) -> None:
        self._send("RELOADING=1")

    def reloaded(self) -> None:
        self._send("READY=1")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def watchdog_due(self) -> float | None:
        """Seconds until the next watchdog ping is due, or None without a watchdog."""
        if self.watchdog_interval is None:
            return None
        return max(0.0, self._next_ping - time.monotonic())

    def ping_watchdog(self) -> None:
        if self.watchdog_interval is None:
            return
        now = time.monotonic()
        if now >= self._next_ping:
            self._send("WATCHDOG=1")
            self._next_ping = now + self.watchdog_interval


def _watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises, if it is meant for us."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2_000_000
