"""Robot settings: /etc/otad/robot.conf plus environment overrides (see otad.config)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from otad.config import boolean, http_url, identifier, optional_path, path, seconds, setting, text, whole
from otad.errors import ConfigError
from otad.keyconfig import check_trust, rollout_keys, trusted_gpg_keyring, trusted_keys
from otad.rollout.signed import check_key_split
from otad.telemetry.tokens import read_own_token
from otad.transfer.tls import check_client_files
from otad.trust.keys import PublicKey

DEFAULT_CONFIG = "/etc/otad/robot.conf"


def machine_id() -> str:
    try:
        value = Path("/etc/machine-id").read_text().strip()
    except OSError:
        value = ""
    return value or "robot"


def _robot_id(raw: str) -> str:
    return identifier(raw or machine_id())


def _whole_or_zero(raw: str) -> int:
    return whole(0)(raw)


def _leases(raw: str) -> str:
    mode = raw.strip().lower()
    if mode not in ("auto", "yes", "no"):
        raise ValueError(f"{raw[:20]!r} is not auto, yes or no")
    return mode


@dataclass(frozen=True)
class RobotSettings:
    gateway_url: str = setting(http_url, doc="the site gateway's edge listener")
    trusted_keys: tuple[PublicKey, ...] = setting(trusted_keys, "/etc/otad/keys", "cosign release public keys; may be empty with a gpg keyring")
    trusted_gpg_keyring: bytes | None = setting(trusted_gpg_keyring, "", "exported gpg public keys for gpg-signed releases; empty: none")
    poll_interval: int = setting(seconds, "30")
    robot_id: str = setting(_robot_id, "", "default: /etc/machine-id")
    state_dir: Path = setting(path, "/var/lib/otad/robot")
    app_dir: Path = setting(path, "/var/lib/otad/app", "holds releases/, CURRENT, OLD, NEW")
    selftest_cmd: str = setting(text, "", "default: the release's own ./selftest if present")
    selftest_timeout: int = setting(seconds, "60")
    health_cmd: str = setting(text, "", "run during probation; empty: no probation checks")
    health_interval: int = setting(seconds, "10")
    probation_s: int = setting(_whole_or_zero, "300", "seconds of health checks after a commit; 0: none")
    restart_cmd: str = setting(text, "", "e.g. systemctl restart robot-app.service")
    max_attempts: int = setting(whole(1), "3", "failed installs of one version before it is blacklisted")
    stall_timeout: int = setting(_whole_or_zero, "0", "seconds the worker may show no progress before the watchdog "
                                 "ping is withheld; 0: 4 x (CONNECT_TIMEOUT + READ_TIMEOUT) + 60")
    max_unpacked_mb: int = setting(whole(1), "4096")
    max_files: int = setting(whole(1), "100000")
    allow_downgrade: bool = setting(boolean, "yes", "obey a signed manifest's allow_downgrade; no: never go below the floor")
    manifest_grace_s: int = setting(_whole_or_zero, "604800", "accept a manifest up to this long after it expired")
    backoff_max: int = setting(seconds, "300")
    connect_timeout: int = setting(seconds, "10")
    read_timeout: int = setting(seconds, "30")
    min_rate: int = setting(_whole_or_zero, "4096", "bytes/s a transfer must keep up over each READ_TIMEOUT window; 0: off")
    # TLS towards the gateway (docs/security.md), when GATEWAY_URL is https://.
    gateway_ca_file: Path | None = setting(optional_path, "", "CA bundle for the gateway's certificate; empty: system store")
    client_cert: Path | None = setting(optional_path, "", "client certificate (PEM) for mutual TLS")
    client_key: Path | None = setting(optional_path, "", "its private key (PEM, chmod 600)")
    # Rollouts (issue 15, docs/security.md "Rollout plans"): empty ROLLOUT_KEYS keeps the
    # behaviour from before them, the newest release the gateway offers.
    rollout_keys: tuple[PublicKey, ...] = setting(rollout_keys, "", "rollout public keys that sign plans; empty: no rollouts")
    token_file: Path | None = setting(optional_path, "", "this robot's token (the telemetry agent's file), sent to the gateway")
    # Site orchestration (issue 16, docs/operations.md "Robot: readiness and install leases").
    leases: str = setting(_leases, "auto", "auto: a lease with TOKEN_FILE, none from a gateway answering 404; yes: always; no: never")
    ready_cmd: str = setting(text, "", "run before asking for a lease: 0 ready, 75 not now (retry-after=S); empty: always ready")
    ready_retry_s: int = setting(seconds, "60", "seconds before READY_CMD runs again after a 75 or an error")
    ready_max_defer_s: int = setting(seconds, "86400", "deferred longer than this: reported deferred_too_long (never forced)")
    ready_timeout_s: int = setting(seconds, "30", "READY_CMD's deadline; a command that overruns it counts as an error")
    inhibit_file: Path | None = setting(optional_path, "", "while this file exists, no install starts (e.g. the app's mission flag)")

    def check(self) -> None:
        check_trust(self.trusted_keys, self.trusted_gpg_keyring)
        check_client_files(self.gateway_ca_file, self.client_cert, self.client_key, "GATEWAY_CA_FILE")
        try:
            check_key_split(self.trusted_keys, self.rollout_keys)
        except ValueError as exc:
            raise ConfigError(f"ROLLOUT_KEYS: {exc}") from None
        if self.token_file is not None:
            read_own_token(self.token_file)  # mode and form checked here; the worker reads it for use
        if self.rollout_keys and self.token_file is None:
            raise ConfigError("ROLLOUT_KEYS needs TOKEN_FILE: the gateway tells robots apart by their token")
        if self.leases == "yes" and self.token_file is None:
            raise ConfigError("LEASES=yes needs TOKEN_FILE: the gateway grants leases by the robot's token")
        if self.stall_timeout == 1:  # the worker beats once a second while it waits or a command runs
            raise ConfigError("STALL_TIMEOUT must be 0 (derived from the timeouts) or at least 2 seconds")

    @property
    def worker_silence(self) -> float:
        """Longest legitimate silence of the worker: a few blocking requests (bundle, checksum, manifest)
        and one slow fsync. Downloads, unpacking, commands within their deadline and planned waits beat."""
        return float(self.stall_timeout or 4 * (self.connect_timeout + self.read_timeout) + 60)

    @property
    def uses_leases(self) -> bool:
        """Ask the gateway for an install lease (LEASES=no, or auto without a token: never)."""
        return self.leases != "no" and self.token_file is not None

    @property
    def max_unpacked_bytes(self) -> int:
        return self.max_unpacked_mb * 1024 * 1024
