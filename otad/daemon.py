"""Main-loop plumbing every otad daemon shares (the nobodd pattern).

Signal handlers only set a flag and wake the main loop; the main loop reloads
the config on SIGHUP, stops cleanly on SIGTERM/SIGINT, pings the systemd
watchdog only while the daemon's workers report progress, and publishes a
human-readable STATUS= line. The daemon's real work runs in worker threads.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from otad import __version__
from otad.cli import ArgumentParser
from otad.config import load_settings
from otad.errors import ConfigError, OtadError
from otad.log import setup_logging
from otad.systemd import Notifier

log = logging.getLogger("otad")


class Heartbeat:
    """A worker thread beats; the main loop pings the watchdog only if all beat recently."""

    def __init__(self, name: str, max_silence: float) -> None:
        self.name = name
        self.max_silence = max_silence
        self._last = time.monotonic()

    def beat(self) -> None:
        self._last = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self._last <= self.max_silence


class Worker(threading.Thread):
    """A worker thread that survives: any exception from `target` is logged in one line,
    and `target` runs again after a backoff (1 s doubling to `backoff_max`), until
    `stopping()` is true. The target is a loop that returns only when asked to stop;
    a return at any other time counts as a failure too. A thread that ends anyway
    (BaseException) is caught by the daemon's main loop, which exits non-zero.
    """

    def __init__(self, name: str, target: Callable[[], None], stopping: Callable[[], bool],
                 on_failure: Callable[[], None] | None = None, backoff_max: float = 30.0) -> None:
        super().__init__(name=name, daemon=True)
        self._work, self._stopping, self._on_failure = target, stopping, on_failure
        self.backoff_max = backoff_max
        self.failures = 0
        self.last_failure: tuple[float, str] | None = None  # (wall clock, "Type: message")
        self._pause = threading.Event()

    def run(self) -> None:
        delay = 1.0
        while not self._stopping():
            began = time.monotonic()
            try:
                self._work()
                if self._stopping():
                    return
                reason = "returned unexpectedly"
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}{_where(exc)}"
            if time.monotonic() - began > 2 * self.backoff_max:
                delay = 1.0  # it ran well for a while: this is a new failure, not the same one again
            self.failures += 1
            self.last_failure = (time.time(), reason)
            log.error("%s failed: %s; starting it again in %.0fs (failure %d)", self.name, reason, delay, self.failures)
            if self._on_failure is not None:
                self._on_failure()
            self._pause.wait(delay)
            delay = min(self.backoff_max, delay * 2)

    def wake(self) -> None:
        """Cut a backoff pause short (at shutdown)."""
        self._pause.set()

    def problem(self, recent: float = 300.0) -> str | None:
        """For STATUS=: the last failure while it is recent."""
        if self.last_failure is None or time.time() - self.last_failure[0] > recent:
            return None
        when = time.strftime("%H:%M:%S", time.localtime(self.last_failure[0]))
        return f"{self.name} failed {self.failures}x, last at {when}: {self.last_failure[1][:160]}"


def _where(exc: BaseException) -> str:
    """The innermost frame of a traceback, so the one log line says where."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" (at {Path(last.filename).name}:{last.lineno} in {last.name})"


class Daemon:
    """Subclass and implement start(), tick(), reload(settings), shutdown(), status()."""

    name = "otad"

    def __init__(self, settings: Any, config_path: Path) -> None:
        self.settings = settings
        self.config_path = config_path
        self.notifier = Notifier()
        self.heartbeats: list[Heartbeat] = []
        self.workers: list[Worker] = []
        self.watched: list[threading.Thread] = []  # threads that must live as long as the daemon
        self._stale: str = ""
        self._wake = threading.Event()
        self._stop = False
        self._reload = False
        self.exit_code = 0

    # -- to implement ---------------------------------------------------------
    def start(self) -> None:
        """Bind sockets, scan state, start workers. READY=1 is sent after it returns."""

    def tick(self) -> float:
        """Main-loop work; return the most seconds the loop may sleep."""
        return 1.0

    def apply_settings(self, settings: Any) -> None:
        self.settings = settings

    def shutdown(self) -> None:
        """Stop workers and close sockets."""

    def status(self) -> str:
        return "running"

    # -- plumbing ---------------------------------------------------------------
    def spawn(self, name: str, target: Callable[[], None], backoff_max: float = 30.0) -> Worker:
        """Start `target` in a Worker: it survives exceptions, and its death stops the daemon."""
        worker = Worker(name, target, stopping=lambda: self._stop, on_failure=self.wake, backoff_max=backoff_max)
        self.workers.append(worker)
        self.watch(worker)
        worker.start()
        return worker

    def adopt(self, worker: Worker) -> None:
        """A Worker started elsewhere (e.g. a library's writer thread): watched, and in STATUS=."""
        self.workers.append(worker)
        self.watch(worker)

    def watch(self, thread: threading.Thread) -> None:
        """The main loop fails the daemon (exit 1) within a tick of `thread` ending."""
        self.watched.append(thread)

    def _check_threads(self) -> None:
        dead = [t.name for t in self.watched if not t.is_alive()]
        if dead and not self._stop:
            self.fail(f"{' and '.join(dead)} thread ended unexpectedly")

    def _full_status(self) -> str:
        """status() plus what the shared machinery knows: failing workers, stalled heartbeats."""
        parts = [self.status()]
        parts += [p for w in self.workers if (p := w.problem())]
        if self._stale:
            parts.append(f"stalled: {self._stale}")
        return "; ".join(parts)

    def _ping_watchdog(self) -> None:
        stale = ", ".join(b.name for b in self.heartbeats if not b.alive())
        if not stale:
            self.notifier.ping_watchdog()
        elif stale != self._stale:
            log.error("worker stalled (%s); withholding the watchdog ping", stale)
        self._stale = stale

    def request_stop(self, *_: object) -> None:
        self._stop = True
        self._wake.set()

    def fail(self, reason: str) -> None:
        """Stop with exit status 1, so systemd's Restart=on-failure starts us again."""
        log.error("%s; exiting so that systemd restarts %s", reason, self.name)
        self.exit_code = 1
        self.request_stop()

    def _request_reload(self, *_: object) -> None:
        self._reload = True
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop

    def _reload_now(self) -> None:
        self._reload = False
        self.notifier.reloading()
        try:
            settings = load_settings(type(self.settings), self.config_path, required=False)
        except OtadError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
        else:
            self.apply_settings(settings)
            log.info("reloaded config from %s", self.config_path)
        self.notifier.reloaded()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self._request_reload)
        self.start()
        self.notifier.ready(self.status())
        log.info("%s %s ready: %s", self.name, __version__, self.status())
        try:
            while not self._stop:
                if self._reload:
                    self._reload_now()
                sleep_for = self.tick()
                self._check_threads()
                if self._stop:
                    break  # a dead worker: no more watchdog pings, exit 1 below
                self._ping_watchdog()
                self.notifier.status(self._full_status())
                due = self.notifier.watchdog_due()
                timeout = min(sleep_for, due) if due is not None else sleep_for
                self._wake.wait(max(0.05, timeout))
                self._wake.clear()
        finally:
            self.notifier.stopping()
            log.info("%s stopping", self.name)
            for worker in self.workers:
                worker.wake()
            self.shutdown()
        return self.exit_code


def daemon_main(
    prog: str,
    default_config: str,
    settings_cls: type,
    make_daemon: Callable[[Any, Path], Daemon],
    argv: list[str] | None = None,
) -> int:
    """The console-script body of every daemon: parse args, load config, run."""
    parser = ArgumentParser(prog=prog)
    parser.add_argument("--config", default=default_config, help=f"config file (default {default_config})")
    parser.add_argument("--check-config", action="store_true", help="validate the config and exit")
    parser.add_argument("--debug", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args: argparse.Namespace = parser.parse_args(argv)
    setup_logging(args.debug)
    config_path = Path(args.config)
    try:
        settings = load_settings(settings_cls, config_path, required=args.config != default_config)
        if args.check_config:
            print(f"{config_path}: OK")
            return 0
        return make_daemon(settings, config_path).run()
    except ConfigError as exc:
        print(f"{prog}: config: {exc}", file=sys.stderr)
        return 1
    except OtadError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if args.debug:
            raise
        # A bug, not an operator error; one line for the journal, --debug for the traceback.
        print(f"{prog}: unexpected {type(exc).__name__}: {exc} (run with --debug for details)", file=sys.stderr)
        return 1
