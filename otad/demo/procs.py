"""The demo's daemons as child processes: each in its own process group, none outliving the demo.

Every daemon is the real console script next to sys.executable, started with
its own config file and its stderr in a log file. Each runs in a new session
(so a Ctrl-C in the terminal reaches only the demo, which then stops them in
order) with PR_SET_PDEATHSIG, so even a `kill -9` of the demo takes them down.
A daemon gets a NOTIFY_SOCKET of its own: the demo reads the same `STATUS=`
lines systemd would show in `systemctl status`.
"""
from __future__ import annotations

import ctypes
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
PR_SET_PDEATHSIG = 1
LISTENING = re.compile(r"listening on (http://\S+)")


def _die_with_parent(parent: int) -> None:
    """Runs in the child between fork and exec."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the demo's own cleanup still stops the group
    if os.getppid() != parent:  # the demo died before prctl took effect
        os._exit(1)


class StatusSocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; keeps the last STATUS=.

    A thread reads it all the time, as systemd does: a notify socket nobody reads
    fills up, and a daemon's next sd_notify would block its main loop.
    """

    def __init__(self, name: str) -> None:
        # An abstract address (Linux), as systemd's own may be: no file, and no
        # 108-byte sun_path limit however deep TMPDIR is. NOTIFY_SOCKET spells it "@...".
        self.path = f"@otad-demo-{os.getpid()}-{secrets.token_hex(4)}-{name}"
        self.address = "\0" + self.path[1:]
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)
        self.sock.settimeout(0.5)
        self.status = ""
        self.ready = False
        self._closing = False
        self._thread = threading.Thread(target=self._read, name=f"notify {name}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closing:
            try:
                message = self.sock.recv(65536).decode("utf-8", "replace")
            except socket.timeout:
                continue
            except OSError:
                return
            for line in message.splitlines():
                if line.startswith("STATUS="):
                    self.status = line[len("STATUS="):]
                elif line == "READY=1":
                    self.ready = True

    def poll(self) -> str:
        return self.status

    def close(self) -> None:
        self._closing = True
        self._thread.join(2)
        self.sock.close()


class Child:
    """One daemon process."""

    def __init__(self, name: str, command: str, config: Path, log: Path, env: dict[str, str],
                 status: StatusSocket | None = None) -> None:
        self.name, self.command, self.config, self.log_path = name, command, config, log
        self.status = status
        env = {**env, "PYTHONUNBUFFERED": "1"}
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_USEC", None)
        if status is not None:
            env["NOTIFY_SOCKET"] = status.path
        parent = os.getpid()
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(BIN / command), "--config", str(config)], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                env=env, start_new_session=True, preexec_fn=lambda: _die_with_parent(parent),
            )
        self.url = ""

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_listening(self, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log())
            if match:
                self.url = match[1]
                return self.url
            if not self.running():
                break
            time.sleep(0.05)
        tail = "\n".join(self.log().splitlines()[-5:])
        raise RuntimeError(f"{self.name} did not start listening (exit {self.proc.poll()}):\n{tail}")

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_all(children: list[Child], timeout: float = 15) -> list[str]:
    """SIGTERM every group, wait, then SIGKILL what is left; returns the names that needed it."""
    for child in children:
        child.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    forced = []
    for child in children:
        if child.running():
            forced.append(child.name)
        # Also reaches what a daemon started and left behind in its group.
        child.signal_group(signal.SIGKILL)
        try:
            child.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if child.status is not None:
            child.status.close()
    return forced
