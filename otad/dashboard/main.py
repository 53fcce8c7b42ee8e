"""`otad-dashboard`: the dashboard's WSGI app served by waitress, run as an otad daemon.

Waitress runs its event loop in a worker thread driven one iteration at a time,
so the main thread (otad.daemon) keeps signals, SIGHUP reloads and the systemd
watchdog, and shutdown stops the loop before closing sockets: no thread ever
touches waitress's socket map while its loop is running.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any

import waitress
from waitress import wasyncore
from waitress.channel import HTTPChannel

from otad.daemon import Daemon, Heartbeat, daemon_main
from otad.dashboard import make_app
from otad.dashboard.app import DashboardApp
from otad.dashboard.ota import OtaFolder
from otad.dashboard.settings import DEFAULT_CONFIG, DashboardSettings
from otad.errors import ConfigError, OtadError
from otad.telemetry.tokens import TokenTable

log = logging.getLogger("otad.dashboard")
PROG = "otad-dashboard"


class HttpServer:
    """A waitress server on one address, its loop in a thread, stoppable from another thread."""

    def __init__(self, app: Any, host: str, port: int, threads: int, heartbeat: Heartbeat | None = None) -> None:
        self._map: dict = {}
        try:
            self._server = waitress.create_server(
                app, map=self._map, host=host, port=port, threads=threads, ident=PROG
            )
        except OSError as exc:
            raise ConfigError(f"LISTEN {host}:{port}: cannot listen ({exc.strerror or exc})") from None
        self._heartbeat = heartbeat
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.effective_host, self._server.effective_port
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        adj = self._server.adj
        try:
            while not self._stopping.is_set():
                wasyncore.loop(timeout=adj.asyncore_loop_timeout, map=self._map, use_poll=adj.asyncore_use_poll, count=1)
                if self._heartbeat is not None:
                    self._heartbeat.beat()
        except Exception as exc:
            # The heartbeat stops, so the systemd watchdog restarts the dashboard.
            log.error("HTTP server loop failed: %s: %s", type(exc).__name__, exc)

    def close(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._server.pull_trigger()  # wake the loop's select() now
        self._thread.join(timeout)
        for dispatcher in list(self._map.values()):
            if isinstance(dispatcher, HTTPChannel):
                # handle_close, unlike close, also wakes a worker waiting to write to the channel;
                # its next write then ends the request.
                dispatcher.handle_close()
        self._server.task_dispatcher.shutdown(cancel_pending=True, timeout=timeout)
        # Last: a worker still finishing a response pulls the trigger, which must stay open until now.
        self._server.close()


class DashboardDaemon(Daemon):
    name = PROG

    def __init__(self, settings: DashboardSettings, config_path: Path) -> None:
        super().__init__(settings, config_path)
        self.app: DashboardApp | None = None
        self.http: HttpServer | None = None

    def start(self) -> None:
        self.app = make_app(self.settings)
        host, port = self.settings.listen
        heartbeat = Heartbeat("http", max_silence=30.0)
        self.http = HttpServer(self.app, host, port, self.settings.threads, heartbeat)
        self.heartbeats.append(heartbeat)
        self.http.start()
        log.info("listening on %s", self.http.url)

    def tick(self) -> float:
        return 5.0

    def status(self) -> str:
        current = self.app.ota.current() if self.app else None
        return f"serving {current.label}" if current else "no release published yet"

    def apply_settings(self, settings: DashboardSettings) -> None:
        old: DashboardSettings = self.settings
        if settings.listen != old.listen or settings.threads != old.threads:
            log.warning("LISTEN and THREADS changes take effect when %s is restarted", PROG)
            settings = dataclasses.replace(settings, listen=old.listen, threads=old.threads)
        if self.app is not None:
            self._reload_tokens(settings)
            if settings.ota_dir != old.ota_dir:
                settings = self._switch_ota_dir(settings, old)
            else:
                self.app.ota.refresh(force=True)
        self.settings = settings

    def _reload_tokens(self, settings: DashboardSettings) -> None:
        assert self.app is not None
        try:
            self.app.telemetry.tokens = TokenTable.from_file(settings.tokens_file) if settings.tokens_file else None
        except OtadError as exc:
            log.error("keeping the previous gateway tokens: %s", exc)

    def _switch_ota_dir(self, settings: DashboardSettings, old: DashboardSettings) -> DashboardSettings:
        assert self.app is not None
        try:
            folder = OtaFolder(settings.ota_dir)
        except OtadError as exc:
            log.error("keeping OTA_DIR %s: %s", old.ota_dir, exc)
            return dataclasses.replace(settings, ota_dir=old.ota_dir)
        previous, self.app.ota = self.app.ota, folder
        previous.close()
        log.info("OTA_DIR is now %s", settings.ota_dir)
        return settings

    def shutdown(self) -> None:
        if self.http is not None:
            self.http.close()
        if self.app is not None:
            self.app.ota.close()
            self.app.telemetry.store.close()


def main(argv: list[str] | None = None) -> int:
    return daemon_main(PROG, DEFAULT_CONFIG, DashboardSettings, DashboardDaemon, argv)
