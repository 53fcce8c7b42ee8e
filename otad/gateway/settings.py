"""Gateway settings: /etc/otad/gateway.conf plus environment overrides (see otad.config)."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

from otad.config import boolean, http_url, identifier, listen_address, optional_path, path, seconds, setting, whole
from otad.errors import ConfigError
from otad.keyconfig import check_trust, rollout_keys, trusted_gpg_keyring, trusted_keys
from otad.orchestration.budget import Groups, Limit, parse_groups, parse_limit
from otad.orchestration.leases import MAX_TTL_S
from otad.orchestration.windows import Schedule, WindowError, parse_timezone, parse_windows
from otad.rollout.signed import check_key_split
from otad.transfer.tls import check_client_files
from otad.trust.keys import PublicKey

DEFAULT_CONFIG = "/etc/otad/gateway.conf"


def _default_gateway_id() -> str:
    return socket.gethostname().split(".")[0] or "gateway"


def _auto_boolean(raw: str) -> bool | None:
    return None if not raw.strip() else boolean(raw)


def _optional_limit(raw: str) -> Limit | None:
    return parse_limit(raw) if raw.strip() else None


def _optional_windows(raw: str) -> Schedule | None:
    return parse_windows(raw.strip()) if raw.strip() else None


def _site_timezone(raw: str, localtime: str = "/etc/localtime") -> ZoneInfo:
    """SITE_TIMEZONE, or the zone the system's /etc/localtime links to (its IANA name), else UTC."""
    if raw.strip():
        return parse_timezone(raw.strip())
    target = os.path.realpath(localtime)
    marker = "/zoneinfo/"
    if marker in target:
        try:
            return parse_timezone(target.split(marker, 1)[1])
        except WindowError:
            pass
    return ZoneInfo("UTC")


@dataclass(frozen=True)
class GatewaySettings:
    dashboard_url: str = setting(http_url, doc="base URL of the central dashboard")
    trusted_keys: tuple[PublicKey, ...] = setting(trusted_keys, "/etc/otad/keys", "cosign release public keys; may be empty with a gpg keyring")
    trusted_gpg_keyring: bytes | None = setting(trusted_gpg_keyring, "", "exported gpg public keys for gpg-signed releases; empty: none")
    listen: tuple[str, int] = setting(listen_address, "0.0.0.0:8081", "edge listener for robots")
    poll_interval: int = setting(seconds, "30", "seconds between manifest polls (+/- 10% jitter)")
    state_dir: Path = setting(path, "/var/lib/otad/gateway")
    cache_dir: Path | None = setting(optional_path, "", "default: STATE_DIR/cache")
    cache_keep_versions: int = setting(whole(1), "3")
    cache_max_mb: int = setting(whole(1), "2048")
    cache_gc_interval: int = setting(seconds, "3600")
    gateway_id: str = setting(identifier, _default_gateway_id())
    backoff_max: int = setting(seconds, "300", "cap of the retry delay after network errors")
    connect_timeout: int = setting(seconds, "10")
    read_timeout: int = setting(seconds, "30", "a transfer with no progress for this long is cut")
    min_rate: int = setting(whole(0), "4096", "bytes/s a transfer must keep up over each READ_TIMEOUT window; 0: off")
    telemetry_db: Path | None = setting(optional_path, "", "default: STATE_DIR/telemetry.db")
    telemetry_max_mb: int = setting(whole(1), "256", "buffer bound; oldest metrics dropped beyond it")
    forward_batch: int = setting(whole(1, 1000), "500")
    token_file: Path | None = setting(optional_path, "", "this gateway's token for the dashboard")
    robot_tokens_file: Path | None = setting(optional_path, "", "'robot_id token' lines")
    # TLS (docs/security.md): towards the dashboard, and on the edge listener.
    dashboard_ca_file: Path | None = setting(optional_path, "", "CA bundle for the dashboard's certificate; empty: system store")
    client_cert: Path | None = setting(optional_path, "", "client certificate (PEM) for mutual TLS to the dashboard")
    client_key: Path | None = setting(optional_path, "", "its private key (PEM, chmod 600)")
    tls_cert: Path | None = setting(optional_path, "", "edge listener certificate (PEM); empty: plain HTTP to robots")
    tls_key: Path | None = setting(optional_path, "", "its private key (PEM, chmod 600)")
    tls_client_ca: Path | None = setting(optional_path, "", "require robot client certificates signed by this CA")
    header_timeout: int = setting(seconds, "20", "a request's header section must arrive within this many seconds")
    # Staged rollouts (issue 15, docs/formats.md "Rollout plan"): empty keeps the newest release for all robots.
    rollout_keys: tuple[PublicKey, ...] = setting(rollout_keys, "", "rollout public keys (sign plans); never a TRUSTED_KEYS key; empty: no rollouts")
    manifest_allow_anonymous: bool | None = setting(_auto_boolean, "", "serve /manifest without a robot token; empty: yes without ROLLOUT_KEYS, no with them")
    # Site orchestration (issue 16, docs/operations.md "Site orchestration"): install leases, Wire 5.
    site_max_concurrent: Limit | None = setting(_optional_limit, "", "robots updating at once: N or P% of ROBOT_TOKENS_FILE's robots; empty: no limit")
    robot_groups: Groups = setting(parse_groups, "", "NAME=ID,ID [max=N|P%] [min_available=N]; groups separated by ';'")
    maintenance_windows: Schedule | None = setting(_optional_windows, "", "when leases are granted, e.g. Mon-Fri 22:00-05:00; empty: always")
    site_timezone: ZoneInfo = setting(_site_timezone, "", "IANA zone of the windows; empty: the system's zone, else UTC")
    lease_ttl_s: int = setting(whole(1, MAX_TTL_S), "300", "a lease not renewed for this long expires")
    lease_retry_s: int = setting(whole(1, 3600), "5", "a waiting robot asks again after this many seconds")
    install_estimate_s: int = setting(whole(0, 7 * 86_400), "600", "expected install time until 3 installs are measured")

    def check(self) -> None:
        check_trust(self.trusted_keys, self.trusted_gpg_keyring)
        check_client_files(self.dashboard_ca_file, self.client_cert, self.client_key, "DASHBOARD_CA_FILE")
        if self.tls_cert is None and (self.tls_key or self.tls_client_ca):
            raise ConfigError("TLS_KEY/TLS_CLIENT_CA are set but TLS_CERT is not")
        try:
            check_key_split(self.trusted_keys, self.rollout_keys)
        except ValueError as exc:
            raise ConfigError(f"ROLLOUT_KEYS: {exc}") from None

    @property
    def anonymous_manifest(self) -> bool:
        """MANIFEST_ALLOW_ANONYMOUS, or its default: robots not yet upgraded keep working without rollouts."""
        if self.manifest_allow_anonymous is None:
            return not self.rollout_keys
        return self.manifest_allow_anonymous

    @property
    def cache_path(self) -> Path:
        return self.cache_dir or self.state_dir / "cache"

    @property
    def telemetry_path(self) -> Path:
        return self.telemetry_db or self.state_dir / "telemetry.db"

    @property
    def cache_max_bytes(self) -> int:
        return self.cache_max_mb * 1024 * 1024
