"""The dashboard's settings: /etc/otad/dashboard.conf plus environment overrides (see otad.config)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from otad.config import listen_address, optional_path, path, seconds, setting, whole

DEFAULT_CONFIG = "/etc/otad/dashboard.conf"
CONFIG_ENV = "OTAD_DASHBOARD_CONFIG"


@dataclass(frozen=True)
class DashboardSettings:
    listen: tuple[str, int] = setting(listen_address, "0.0.0.0:8080", "HOST:PORT to serve HTTP on ([::1]:PORT for IPv6)")
    ota_dir: Path = setting(path, "/srv/otad/ota", "the folder `otad-release publish` writes releases into")
    state_dir: Path = setting(path, "/var/lib/otad/dashboard", "the dashboard's own state (telemetry database)")
    threads: int = setting(whole(1, 256), "8", "HTTP worker threads")
    db_path: Path | None = setting(optional_path, "", "telemetry database (default: STATE_DIR/telemetry.db)")
    tokens_file: Path | None = setting(optional_path, "", "'gateway_id token' lines; empty: telemetry ingest disabled")
    rollout_key: Path | None = setting(optional_path, "", "private key signing rollout plans (otad-release keygen; "
                                       "mode 0600); empty: rollouts disabled")
    operator_tokens_file: Path | None = setting(optional_path, "", "'operator_id token' lines for the rollout admin API; "
                                                "empty: admin API disabled")
    rollout_check_interval: int = setting(seconds, "5", "seconds between checks of the rollouts' fleet-wide halt criteria (also checked when events arrive)")
    header_timeout: int = setting(seconds, "20", "a request's header section must arrive within this many seconds")
    connection_limit: int = setting(whole(1, 100000), "1000", "open connections at most; beyond, new ones wait")

    @property
    def telemetry_path(self) -> Path:
        return self.db_path or self.state_dir / "telemetry.db"
