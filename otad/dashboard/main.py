"""`otad-dashboard`: the dashboard's WSGI app served by waitress, run as an otad daemon.

Waitress runs its event loop in a worker thread driven one iteration at a time,
so the main thread (otad.daemon) keeps signals, SIGHUP reloads and the systemd
watchdog, and shutdown stops the loop before closing sockets: no thread ever
touches waitress's socket map while its loop is running.

Hostile clients (docs/security.md): waitress buffers every request in its one
I/O thread before a worker sees it, so slow clients hold no worker. Limits on
top of that: a header section of at most 64 KiB (431), bodies of at most
MAX_BODY_BYTES (413), at most CONNECTION_LIMIT connections, idle ones closed
after CHANNEL_TIMEOUT, and, checked from the loop thread, a request whose
header section is not in after HEADER_TIMEOUT (or whose body falls below
MIN_BODY_RATE) is closed: waitress's own timeout only sees inactivity, and a
client trickling a byte a second is never inactive. Waitress's own error
responses are JSON, like the app's. TLS: waitress has none; nginx in front
terminates it (docs/security.md), and LISTEN is then a loopback address.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import waitress
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask

from otad.daemon import Daemon, Heartbeat, Worker, daemon_main
from otad.dashboard import make_app
from otad.dashboard.app import DashboardApp
from otad.dashboard.ota import OtaFolder
from otad.dashboard.settings import DEFAULT_CONFIG, DashboardSettings
from otad.errors import ConfigError, OtadError
from otad.dashboard.ingest import MAX_WIRE_BYTES
from otad.telemetry.tokens import TokenTable, check_private
from otad.transfer.server import MAX_HEADER_BYTES, MIN_BODY_RATE
from otad.transfer.tls import is_loopback

log = logging.getLogger("otad.dashboard")
PROG = "otad-dashboard"
CHANNEL_TIMEOUT = 60  # seconds without a byte either way: waitress closes the connection
MAX_BODY_BYTES = 2 * MAX_WIRE_BYTES  # waitress answers 413 beyond; the app's own limit is lower
SLOW_CHECK_EVERY = 0.5


class JsonErrorTask(ErrorTask):
    """Waitress's own error answers (400, 413, 431, ...) as otad's one-line JSON errors."""

    def execute(self) -> None:
        error = self.request.error
        body = (json.dumps({"error": f"{error.reason}: {error.body}"[:300]}) + "\n").encode()
        self.status = f"{error.code} {error.reason}"
        # waitress 2.1 (bookworm) has no set_close_on_finish(): do what it does, for both versions.
        self.response_headers.extend([("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                      ("Connection", "close")])
        self.close_on_finish = True
        self.content_length = len(body)
        self.write(body)


class Channel(HTTPChannel):
    error_task_class = JsonErrorTask


class HttpServer:
    """A waitress server on one address, its loop in a thread, stoppable from another thread."""

    def __init__(self, app: Any, host: str, port: int, threads: int, heartbeat: Heartbeat | None = None,
                 header_timeout: float = 20.0, connection_limit: int = 1000) -> None:
        self._map: dict = {}
        try:
            self._server = waitress.create_server(
                app, map=self._map, host=host, port=port, threads=threads, ident=PROG,
                channel_timeout=CHANNEL_TIMEOUT, cleanup_interval=10, connection_limit=connection_limit,
                max_request_header_size=MAX_HEADER_BYTES, max_request_body_size=MAX_BODY_BYTES,
            )
        except OSError as exc:
            raise ConfigError(f"LISTEN {host}:{port}: cannot listen ({exc.strerror or exc})") from None
        self._server.channel_class = Channel
        self._header_timeout = header_timeout
        self._next_slow_check = 0.0
        self._heartbeat = heartbeat
        self._stopping = threading.Event()
        self.thread = Worker("http", self._loop, stopping=self._stopping.is_set)

    @property
    def url(self) -> str:
        host, port = self._server.effective_host, self._server.effective_port
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        # An exception ends this call; the Worker logs it and runs the loop again after a pause.
        adj = self._server.adj
        while not self._stopping.is_set():
            wasyncore.loop(timeout=adj.asyncore_loop_timeout, map=self._map, use_poll=adj.asyncore_use_poll, count=1)
            now = time.monotonic()
            if now >= self._next_slow_check:
                self._close_slow_requests(now)
                self._next_slow_check = now + SLOW_CHECK_EVERY
            if self._heartbeat is not None:
                self._heartbeat.beat()

    def _close_slow_requests(self, now: float) -> None:
        """Close channels whose request is still arriving past its deadline (runs in the loop thread)."""
        for channel in list(self._map.values()):
            request = getattr(channel, "request", None) if isinstance(channel, HTTPChannel) else None
            if request is None or request.completed:
                continue
            started = getattr(request, "otad_started", None)
            if started is None:
                request.otad_started = now  # first seen: within SLOW_CHECK_EVERY of its first byte
                continue
            allowed = self._header_timeout
            if request.headers_finished:
                allowed += (request.content_length or 0) / MIN_BODY_RATE
            if now - started > allowed:
                log.debug("closing a connection from %s: request still incomplete after %.0fs", channel.addr[0] if channel.addr else "?", now - started)
                channel.handle_close()

    def close(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._server.pull_trigger()  # wake the loop's select() now
        self.thread.wake()
        self.thread.join(timeout)
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
        self._warn_token_mode(self.settings)
        host, port = self.settings.listen
        heartbeat = Heartbeat("http", max_silence=30.0)
        self.http = HttpServer(self.app, host, port, self.settings.threads, heartbeat,
                               self.settings.header_timeout, self.settings.connection_limit)
        self.heartbeats.append(heartbeat)
        self.http.start()
        self.adopt(self.http.thread)
        if self.app.rollouts is not None and self.app.rollouts.key is not None:
            self.spawn("rollout-halts", self._fleet_halts)
        elif self.settings.rollout_key is None:
            log.info("rollouts disabled: ROLLOUT_KEY is not set (/rollouts.json serves no plan)")
        log.info("listening on %s", self.http.url)
        if not is_loopback(host):
            log.warning("serving plain HTTP on %s: gateway tokens and telemetry cross the WAN unencrypted; terminate "
                        "TLS in front (nginx) and set LISTEN to a loopback address (docs/security.md)", self.http.url)

    def tick(self) -> float:
        return 5.0

    def _fleet_halts(self) -> None:
        """Apply the fleet-wide halt criteria of every active plan as soon as gateways forward rollout
        events, and every ROLLOUT_CHECK_INTERVAL (install timeouts need no event)."""
        assert self.app is not None and self.app.rollouts is not None
        desk = self.app.rollouts
        while not self.stopping:
            desk.check_fleet(time.time())
            desk.wait_for_evidence(self.settings.rollout_check_interval)

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
            return
        if self.app.rollouts is not None:
            try:
                self.app.rollouts.operators = (TokenTable.from_file(settings.operator_tokens_file)
                                               if settings.operator_tokens_file else None)
            except OtadError as exc:
                log.error("keeping the previous operator tokens: %s", exc)
        self._warn_token_mode(settings)

    @staticmethod
    def _warn_token_mode(settings: DashboardSettings) -> None:
        if settings.tokens_file is None:
            log.warning("telemetry ingest disabled: TOKENS_FILE is not set (POST /metrics answers 401)")
        elif warning := check_private(settings.tokens_file):
            log.warning("%s", warning)
        for secret in (settings.operator_tokens_file, settings.rollout_key):
            if secret is not None and (warning := check_private(secret)):
                log.warning("%s", warning)

    def _switch_ota_dir(self, settings: DashboardSettings, old: DashboardSettings) -> DashboardSettings:
        assert self.app is not None
        try:
            folder = OtaFolder(settings.ota_dir)
        except OtadError as exc:
            log.error("keeping OTA_DIR %s: %s", old.ota_dir, exc)
            return dataclasses.replace(settings, ota_dir=old.ota_dir)
        previous, self.app.ota = self.app.ota, folder
        if self.app.rollouts is not None:
            self.app.rollouts.ota = folder
        previous.close()
        log.info("OTA_DIR is now %s", settings.ota_dir)
        return settings

    def shutdown(self) -> None:
        if self.app is not None and self.app.rollouts is not None:
            self.app.rollouts.wake()  # the fleet-halt loop's sleep ends
        if self.http is not None:
            self.http.close()
        if self.app is not None:
            self.app.ota.close()
            self.app.telemetry.store.close()


def main(argv: list[str] | None = None) -> int:
    return daemon_main(PROG, DEFAULT_CONFIG, DashboardSettings, DashboardDaemon, argv)
