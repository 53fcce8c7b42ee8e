"""A stand-in for systemd's notify socket, for tests that read sd_notify messages."""
from __future__ import annotations

import socket


class NotifySocket:
    """A real datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def close(self) -> None:
        self.sock.close()
