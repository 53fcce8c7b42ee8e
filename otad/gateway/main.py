"""`otad-gateway`: wiring of cache, sync worker and edge listener under the shared daemon loop."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from otad.daemon import Daemon, Heartbeat, daemon_main
from otad.errors import ConfigError
from otad.gateway.buffer import TelemetryBuffer
from otad.gateway.cache import Cache
from otad.gateway.edge import Ingest, make_edge_server
from otad.gateway.forwarder import Forwarder
from otad.gateway.leasefiles import OrchestrationFileError
from otad.gateway.orchestrator import OrchestrationSettings, Orchestrator
from otad.gateway.settings import DEFAULT_CONFIG, GatewaySettings
from otad.gateway.rollouts import Rollouts
from otad.gateway.sync import Syncer
from otad.trust import clock
from otad.telemetry.tokens import TokenTable, check_private, read_own_token
from otad.transfer.client import TransferLimits
from otad.transfer.server import ServerLimits
from otad.transfer.tls import client_tls, is_loopback, plain_http_warning, server_context
from otad.trust.verify import TrustAnchors

log = logging.getLogger("otad.gateway")


class Gateway(Daemon):
    name = "otad-gateway"

    def __init__(self, settings: GatewaySettings, config_path: Path) -> None:
        super().__init__(settings, config_path)
        self.cache = Cache(settings.cache_path, TrustAnchors(cosign_keys=settings.trusted_keys, gpg_keyring=settings.trusted_gpg_keyring))
        # A download makes progress at least every READ_TIMEOUT; a poll ends within
        # the connect + read timeouts. Silence far beyond that means a hung worker.
        self.sync_beat = Heartbeat("sync", max_silence=4 * (settings.connect_timeout + settings.read_timeout) + 60)
        self.forward_beat = Heartbeat("forwarder", max_silence=settings.backoff_max + 2 * (settings.connect_timeout + settings.read_timeout) + 60)
        self.heartbeats += [self.sync_beat, self.forward_beat]

    def start(self) -> None:
        self.cache.load()
        self.buffer = TelemetryBuffer(self.settings.telemetry_path, self.settings.telemetry_max_mb * 2**20)
        self.buffer.start()
        settings = self.settings
        self.rollouts = Rollouts(settings.state_dir, settings.gateway_id, settings.rollout_keys, settings.trusted_keys, clock.now())
        self.orchestrator = Orchestrator(settings.state_dir, orchestration_settings(settings), self._plans, clock.now())
        self.ingest = Ingest(self.buffer, None, self.rollouts, settings.anonymous_manifest, self.orchestrator)
        self.forwarder = Forwarder(self.buffer, self.forward_beat)
        self.syncer = Syncer(self.settings, self.cache, self.sync_beat, self.rollouts)
        self._load_tokens(self.settings)
        context = server_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca) if settings.tls_cert else None
        limits = ServerLimits(header_timeout=settings.header_timeout)
        self.server = make_edge_server(settings.listen, self.cache, self.ingest, context, limits)
        log.info("listening on %s", self.server.url)
        for warning in (plain_http_warning(settings.dashboard_url, "DASHBOARD_URL"),
                        plain_http_warning(self.server.url, "edge listener") if not is_loopback(settings.listen[0]) else None):
            if warning:
                log.warning("%s", warning)
        self.adopt(self.buffer.thread)
        self.watch(self.server.start_thread("edge"))
        self.sync_thread = self.spawn("sync", self.syncer.run)
        self.forward_thread = self.spawn("forwarder", self.forwarder.run)

    def _load_tokens(self, settings: GatewaySettings) -> None:
        """Token files are (re)read at start and on SIGHUP; a bad file keeps the old tokens."""
        try:
            robots = TokenTable.from_file(settings.robot_tokens_file) if settings.robot_tokens_file else None
            own = read_own_token(settings.token_file) if settings.token_file else None
        except ConfigError as exc:
            if getattr(self, "ingest", None) is not None and self.ingest.tokens is not None:
                log.error("keeping the previous tokens: %s", exc)
                return
            raise
        for path in (settings.robot_tokens_file, settings.token_file):
            warning = check_private(path) if path else None
            if warning:
                log.warning("%s", warning)
        if robots is None:
            log.warning("telemetry ingest disabled: ROBOT_TOKENS_FILE is not set")
        if own is None:
            log.warning("telemetry forwarding disabled: TOKEN_FILE is not set (records stay buffered)")
        self.ingest.tokens = robots
        self.orchestrator.site_robots = max(1, len(robots) if robots is not None else 0)
        self.ingest.anonymous = settings.anonymous_manifest
        self.syncer.token = own
        limits = TransferLimits(settings.connect_timeout, settings.read_timeout)
        self.forwarder.configure(settings.dashboard_url, settings.gateway_id, own, settings.forward_batch,
                                 settings.backoff_max, limits, client_tls(settings, "dashboard_ca_file"))

    def _plans(self) -> list:
        """The verified current plans (their site_max_concurrent and windows override the config)."""
        return [c.plan for c in list(self.rollouts.current.values())] if self.rollouts.enabled else []

    def tick(self) -> float:
        try:
            self.orchestrator.sweep(clock.now())
        except OrchestrationFileError:
            pass  # logged; the next POST /lease saves it again (or answers 503)
        except Exception as exc:  # a bug must not stop the daemon's loop
            log.error("lease: sweep failed: %s: %s", type(exc).__name__, exc)
        return 1.0

    def apply_settings(self, settings: GatewaySettings) -> None:
        if settings.listen != self.settings.listen:
            log.warning("LISTEN changed to %s:%d; it takes effect at the next restart", *settings.listen)
        if settings.cache_path != self.settings.cache_path:
            log.warning("CACHE_DIR/STATE_DIR changed; it takes effect at the next restart")
        self.settings = settings
        self.orchestrator.configure(orchestration_settings(settings))
        self.syncer.apply(settings)
        self._load_tokens(settings)

    def shutdown(self) -> None:
        self.syncer.stop()
        self.forwarder.stop()
        self.server.shutdown()
        self.server.server_close()
        self.sync_thread.join(timeout=10)
        self.forward_thread.join(timeout=10)
        self.buffer.close()

    def status(self) -> str:
        snapshot = self.cache.snapshot
        parts = [f"serving {snapshot.active.manifest.name} {snapshot.active.manifest.version}" if snapshot.active else "no release cached"]
        state = getattr(self, "syncer", None) and self.syncer.state
        if state and state.downloading:
            percent = 100 * state.received // state.total if state.total else 0
            parts.append(f"downloading {state.downloading} ({percent}%)")
        if state and state.wan_down_since is not None:
            parts.append("dashboard unreachable since " + time.strftime("%H:%M", time.localtime(state.wan_down_since)))
        orchestrator = getattr(self, "orchestrator", None)
        if orchestrator is not None and getattr(self, "ingest", None) is not None and self.ingest.tokens is not None:
            parts.append(orchestrator.status(clock.now()))  # without robot tokens there are no leases
        forwarder = getattr(self, "forwarder", None)
        if forwarder is not None:
            text = f"telemetry: {self.buffer.backlog():,} pending"
            if self.buffer.quarantined:
                text += f", {self.buffer.quarantined:,} quarantined"
            if self.buffer.refused:
                text += f", {self.buffer.refused:,} refused (seq went backwards)"
            if forwarder.down_since is not None:
                text += ", WAN down since " + time.strftime("%H:%M", time.localtime(forwarder.down_since))
            parts.append(text)
        return "; ".join(parts)


def orchestration_settings(settings: GatewaySettings) -> OrchestrationSettings:
    return OrchestrationSettings(settings.gateway_id, settings.site_max_concurrent, settings.robot_groups,
                                 settings.maintenance_windows, settings.site_timezone, settings.lease_ttl_s,
                                 settings.lease_retry_s, settings.install_estimate_s)


def main(argv: list[str] | None = None) -> int:
    return daemon_main("otad-gateway", DEFAULT_CONFIG, GatewaySettings, Gateway, argv)


if __name__ == "__main__":
    sys.exit(main())
