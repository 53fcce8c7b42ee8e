"""`otad-gateway`: wiring of cache, sync worker and edge listener under the shared daemon loop."""
from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

from otad.daemon import Daemon, Heartbeat, daemon_main
from otad.gateway.cache import Cache
from otad.gateway.edge import make_edge_server
from otad.gateway.settings import DEFAULT_CONFIG, GatewaySettings
from otad.gateway.sync import Syncer
from otad.trust.verify import TrustAnchors

log = logging.getLogger("otad.gateway")


class Gateway(Daemon):
    name = "otad-gateway"

    def __init__(self, settings: GatewaySettings, config_path: Path) -> None:
        super().__init__(settings, config_path)
        self.cache = Cache(settings.cache_path, TrustAnchors(cosign_keys=settings.trusted_keys))
        # A download makes progress at least every READ_TIMEOUT; a poll ends within
        # the connect + read timeouts. Silence far beyond that means a hung worker.
        self.sync_beat = Heartbeat("sync", max_silence=4 * (settings.connect_timeout + settings.read_timeout) + 60)
        self.heartbeats.append(self.sync_beat)

    def start(self) -> None:
        self.cache.load()
        self.server = make_edge_server(self.settings.listen, self.cache)
        log.info("listening on %s", self.server.url)
        self.syncer = Syncer(self.settings, self.cache, self.sync_beat)
        self.server_thread = self.server.start_thread("edge")
        self.sync_thread = threading.Thread(target=self.syncer.run, name="sync", daemon=True)
        self.sync_thread.start()

    def tick(self) -> float:
        if not self.server_thread.is_alive():
            self.fail("edge listener stopped unexpectedly")
        return 1.0

    def apply_settings(self, settings: GatewaySettings) -> None:
        if settings.listen != self.settings.listen:
            log.warning("LISTEN changed to %s:%d; it takes effect at the next restart", *settings.listen)
        if settings.cache_path != self.settings.cache_path:
            log.warning("CACHE_DIR/STATE_DIR changed; it takes effect at the next restart")
        self.settings = settings
        self.syncer.apply(settings)

    def shutdown(self) -> None:
        self.syncer.stop()
        self.server.shutdown()
        self.server.server_close()
        self.sync_thread.join(timeout=10)

    def status(self) -> str:
        snapshot = self.cache.snapshot
        parts = [f"serving {snapshot.active.manifest.name} {snapshot.active.manifest.version}" if snapshot.active else "no release cached"]
        state = getattr(self, "syncer", None) and self.syncer.state
        if state and state.downloading:
            percent = 100 * state.received // state.total if state.total else 0
            parts.append(f"downloading {state.downloading} ({percent}%)")
        if state and state.wan_down_since is not None:
            parts.append("dashboard unreachable since " + time.strftime("%H:%M", time.localtime(state.wan_down_since)))
        return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    return daemon_main("otad-gateway", DEFAULT_CONFIG, GatewaySettings, Gateway, argv)


if __name__ == "__main__":
    sys.exit(main())
