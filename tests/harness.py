"""Start the real daemons as processes and watch them: the tests' only way to run otad.

Every wait here is a condition polled against a deadline; nothing sleeps and hopes.
Daemons listen on port 0 and log `listening on http://HOST:PORT`; the harness
reads the address from that line, so tests never race for a free port.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

BIN = Path(sys.executable).parent
T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Return predicate()'s first truthy value, or fail the test naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def write_config(path: Path, values: dict[str, object]) -> Path:
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    return path


class Daemon:
    """One daemon process with its stderr captured in a log file the test can read."""

    def __init__(self, command: str, config: Path, log: Path, env: dict[str, str] | None = None, args: list[str] | None = None):
        self.command, self.config, self.log_path = command, config, log
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env.pop("NOTIFY_SOCKET", None) if "NOTIFY_SOCKET" not in (env or {}) else None
        self.args = args or []
        self.wrap: list[str] = []  # a command the daemon runs under, e.g. unshare (tests/powercut_agent.py)
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self._log_offset = 0

    def start(self, wait_listening: bool = True, timeout: float = 20) -> "Daemon":
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.wrap, str(BIN / self.command), "--config", str(self.config), *self.args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env,
            )
        if wait_listening:
            match = self.wait_for_log(r"listening on (http://\S+)", timeout)
            self.url = match[1]
        return self

    def pin_port(self) -> None:
        """Rewrite LISTEN to the port bound now, so a restart comes back on the same address."""
        host_port = self.url.removeprefix("http://")
        lines = [f"LISTEN={host_port}" if line.startswith("LISTEN=") else line for line in self.config.read_text().splitlines()]
        self.config.write_text("\n".join(lines) + "\n")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def new_log(self) -> str:
        """The log written since the last start()."""
        return self.log()[self._log_offset:]

    def wait_for_log(self, pattern: str, timeout: float = 20) -> re.Match:
        compiled = re.compile(pattern)

        def found():
            if self.proc is not None and self.proc.poll() is not None:
                match = compiled.search(self.new_log())
                if match:
                    return match
                raise AssertionError(f"{self.command} exited with {self.proc.returncode} before logging {pattern!r}:\n{self.new_log()[-3000:]}")
            return compiled.search(self.new_log())

        return wait_until(found, timeout, f"{self.command} to log {pattern!r}")

    def wait_for_count(self, text: str, count: int = 1, timeout: float = 20) -> str:
        """The log since start() once `text` is in it `count` times or more.

        A daemon logs an event after it happens, so a line read right after some other
        sign of the event (a drained spool, a served release) may not be written yet:
        wait for it, then assert on the exact count.
        """
        def counted():
            log = self.new_log()
            return log if log.count(text) >= count else ""

        return wait_until(counted, timeout, f"{self.command} to log {text!r} {count} time(s)")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(f"{self.command} did not stop within {timeout}s of SIGTERM")
        return self.proc.returncode

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def run_command(command: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / command), *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
    )
