"""Telemetry agent settings: /etc/otad/telemetry-agent.conf plus environment overrides (see otad.config)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from otad.config import http_url, optional_path, path, seconds, setting, text, whole
from otad.robot.settings import _robot_id
from otad.telemetry.records import MAX_RECORDS
from otad.transfer.tls import check_client_files

DEFAULT_CONFIG = "/etc/otad/telemetry-agent.conf"


@dataclass(frozen=True)
class AgentSettings:
    gateway_url: str = setting(http_url, doc="the site gateway's edge listener; records go to /metrics")
    # The same default as otad-robot, so events and metrics of one robot carry one id.
    robot_id: str = setting(_robot_id, "", "default: /etc/machine-id")
    interval: int = setting(seconds, "10", "seconds between metric samples")
    app_dir: Path = setting(path, "/var/lib/otad/app", "the version is read from APP_DIR/CURRENT")
    health_cmd: str = setting(text, "", "exit 0 ok, 1 degraded, else failed; empty: always ok")
    health_timeout: int = setting(seconds, "10")
    spool_max_mb: int = setting(whole(1), "16", "disk bound of the spool; oldest metrics are dropped beyond it")
    token_file: Path = setting(path, "/etc/otad/telemetry-agent.token")
    state_dir: Path = setting(path, "/var/lib/otad/agent", "holds spool.db")
    robot_state_dir: Path = setting(path, "/var/lib/otad/robot", "otad-robot's STATE_DIR: its event outbox")
    batch: int = setting(whole(1, MAX_RECORDS), "100", "records per POST")
    backoff_max: int = setting(seconds, "300")
    connect_timeout: int = setting(seconds, "10")
    read_timeout: int = setting(seconds, "30")
    # TLS towards the gateway (docs/security.md), when GATEWAY_URL is https://.
    gateway_ca_file: Path | None = setting(optional_path, "", "CA bundle for the gateway's certificate; empty: system store")
    client_cert: Path | None = setting(optional_path, "", "client certificate (PEM) for mutual TLS")
    client_key: Path | None = setting(optional_path, "", "its private key (PEM, chmod 600)")

    def check(self) -> None:
        check_client_files(self.gateway_ca_file, self.client_cert, self.client_key, "GATEWAY_CA_FILE")

    @property
    def spool_max_bytes(self) -> int:
        return self.spool_max_mb * 1024 * 1024

    @property
    def spool_path(self) -> Path:
        return self.state_dir / "spool.db"
