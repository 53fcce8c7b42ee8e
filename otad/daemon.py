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


class Daemon:
    """Subclass and implement start(), tick(), reload(settings), shutdown(), status()."""

    name = "otad"

    def __init__(self, settings: Any, config_path: Path) -> None:
        self.settings = settings
        self.config_path = config_path
        self.notifier = Notifier()
        self.heartbeats: list[Heartbeat] = []
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
                if all(beat.alive() for beat in self.heartbeats):
                    self.notifier.ping_watchdog()
                else:
                    stale = ", ".join(b.name for b in self.heartbeats if not b.alive())
                    log.error("worker stalled (%s); withholding the watchdog ping", stale)
                self.notifier.status(self.status())
                due = self.notifier.watchdog_due()
                timeout = min(sleep_for, due) if due is not None else sleep_for
                self._wake.wait(max(0.05, timeout))
                self._wake.clear()
        finally:
            self.notifier.stopping()
            log.info("%s stopping", self.name)
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
