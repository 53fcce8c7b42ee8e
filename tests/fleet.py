"""A site on loopback for tests: a real dashboard, real gateways, releases built with the real CLI."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import requests

from conftest import make_app, otad_release
from harness import Daemon, wait_until, write_config


class Site:
    def __init__(self, root: Path, key: Path, pub: Path) -> None:
        self.root, self.key, self.pub = root, key, pub
        self.ota = root / "ota"
        self.ota.mkdir()
        self.dashboard: Daemon | None = None
        self.gateways: list[Daemon] = []
        self.robots: list[Daemon] = []

    # -- releases -------------------------------------------------------------------
    def build(self, version: str, size: int = 64 * 1024, key: Path | None = None, seed: int = 0,
              selftest: str | None = "exit 0", extra: dict[str, bytes] | None = None, args: tuple[str, ...] = ()) -> Path:
        """Build a release into its own folder; the app holds `size` bytes of random data.

        `selftest` is the body of the release's own ./selftest script (None: no script);
        `args` go to `otad-release build` as they are (e.g. "--expires-in", "-1").
        """
        files = {"bin/app": b"#!/bin/sh\necho app\n", "data.bin": _random_bytes(size, seed or hash(version) & 0xFFFF)}
        if selftest is not None:
            files["selftest"] = f"#!/bin/sh\n{selftest}\n".encode()
        app = make_app(self.root / f"app-{version}", version, {**files, **(extra or {})})
        if selftest is not None:
            (app / "selftest").chmod(0o755)
        out = self.root / f"out-{version}-{(key or self.key).stem}"
        result = otad_release("build", "--app-dir", str(app), "--version", version, "--key", str(key or self.key), "--out", str(out), *args)
        assert result.returncode == 0, result.stderr
        return out

    def publish(self, out: Path) -> dict:
        result = otad_release("publish", "--from", str(out), "--to", str(self.ota))
        assert result.returncode == 0, result.stderr
        return json.loads((out / "manifest.json").read_text())

    def publish_tampered(self, out: Path) -> dict:
        """Publish `out` by hand with one bit of its artifact flipped, the artifact before the manifest.

        `otad-release publish` would refuse the tampered artifact, and tampering after publishing
        races a gateway's 1 s poll: this way no gateway ever sees the genuine artifact.
        """
        manifest = json.loads((out / "manifest.json").read_text())
        data = bytearray((out / manifest["artifact"]).read_bytes())
        data[len(data) // 2] ^= 0x01
        (self.ota / manifest["artifact"]).write_bytes(bytes(data))
        for name in (manifest["bundle"], manifest["checksum"], "manifest.json.bundle", "manifest.json"):
            (self.ota / f".{name}.tmp").write_bytes((out / name).read_bytes())
            os.replace(self.ota / f".{name}.tmp", self.ota / name)
        return manifest

    def release(self, version: str, size: int = 64 * 1024, **build) -> dict:
        return self.publish(self.build(version, size, **build))

    # -- daemons ----------------------------------------------------------------------
    def start_dashboard(self, env: dict | None = None, **overrides) -> Daemon:
        config = write_config(self.root / "dashboard.conf", {
            "LISTEN": "127.0.0.1:0", "OTA_DIR": self.ota, "STATE_DIR": self.root / "dashboard-state", **overrides,
        })
        self.dashboard = Daemon("otad-dashboard", config, self.root / "dashboard.log", env=env).start()
        self.dashboard.pin_port()  # gateways keep its URL across the stops and starts of a test
        return self.dashboard

    def gateway(self, dashboard_url: str | None = None, name: str = "gw", env: dict | None = None, **overrides) -> Daemon:
        values = {
            "DASHBOARD_URL": dashboard_url or self.dashboard.url,
            "TRUSTED_KEYS": self.pub,
            "LISTEN": "127.0.0.1:0",
            "STATE_DIR": self.root / f"{name}-state",
            "POLL_INTERVAL": 1,
            "BACKOFF_MAX": 2,
            "CONNECT_TIMEOUT": 2,
            "READ_TIMEOUT": 3,
            "GATEWAY_ID": name,
            **overrides,
        }
        config = write_config(self.root / f"{name}.conf", values)
        daemon = Daemon("otad-gateway", config, self.root / f"{name}.log", env=env)
        self.gateways.append(daemon)
        return daemon

    def robot(self, gateway_url: str, name: str = "robot", env: dict | None = None, **overrides) -> Daemon:
        values = {
            "GATEWAY_URL": gateway_url,
            "TRUSTED_KEYS": self.pub,
            "ROBOT_ID": name,
            "STATE_DIR": self.root / f"{name}-state",
            "APP_DIR": self.root / f"{name}-app",
            "POLL_INTERVAL": 1,
            "BACKOFF_MAX": 2,
            "CONNECT_TIMEOUT": 2,
            "READ_TIMEOUT": 3,
            "SELFTEST_TIMEOUT": 10,
            "PROBATION_S": 0,
            "RESTART_CMD": f"echo restarted $OTAD_VERSION >> {self.root / f'{name}-restarts.log'}",
            **overrides,
        }
        config = write_config(self.root / f"{name}.conf", values)
        daemon = Daemon("otad-robot", config, self.root / f"{name}.log", env=env)
        self.robots.append(daemon)
        return daemon

    def agent(self, gateway_url: str, name: str = "robot", token_file: Path | None = None, **overrides) -> Daemon:
        """A telemetry agent beside robot `name` (same APP_DIR, draining its outbox)."""
        if token_file is None:
            token_file = self.root / f"{name}-agent.token"
            token_file.write_text(robot_token(name) + "\n")
            token_file.chmod(0o600)
        values = {
            "GATEWAY_URL": gateway_url, "ROBOT_ID": name, "INTERVAL": 1, "TOKEN_FILE": token_file,
            "STATE_DIR": self.root / f"{name}-agent-state", "APP_DIR": self.root / f"{name}-app",
            "ROBOT_STATE_DIR": self.root / f"{name}-state", "BACKOFF_MAX": 2, "CONNECT_TIMEOUT": 2, "READ_TIMEOUT": 3,
            **overrides,
        }
        config = write_config(self.root / f"{name}-agent.conf", values)
        daemon = Daemon("telemetry-agent", config, self.root / f"{name}-agent.log")
        self.robots.append(daemon)
        return daemon

    def stop_all(self) -> None:
        for daemon in [*self.robots, *self.gateways, self.dashboard]:
            if daemon is not None and daemon.running():
                daemon.kill9()


def served_manifest(url: str) -> dict | None:
    try:
        response = requests.get(f"{url}/manifest", timeout=5)
    except requests.RequestException:
        return None
    return response.json() if response.status_code == 200 else None


def wait_for_version(url: str, version: str, timeout: float = 20) -> dict:
    return wait_until(lambda: (m := served_manifest(url)) and m.get("version") == version and m, timeout, f"{url} to serve {version}")


def fetch_release(url: str, manifest: dict) -> bytes:
    """Download a served release and check it against its manifest, as a robot would."""
    artifact = requests.get(f"{url}/ota/{manifest['artifact']}", timeout=30)
    assert artifact.status_code == 200, artifact.text
    assert len(artifact.content) == manifest["size"]
    assert hashlib.sha256(artifact.content).hexdigest() == manifest["sha256"]
    for name in (manifest["bundle"], manifest["checksum"]):
        assert requests.get(f"{url}/ota/{name}", timeout=10).status_code == 200
    return artifact.content


def _random_bytes(size: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(size)


def rss_high_water_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


# -- telemetry ---------------------------------------------------------------------------

ROBOT_TOKEN = "robot-token-0123456789"
GATEWAY_TOKEN = "gateway-token-0123456789"


def write_tokens(root: Path, robots: list[str], gateway: str = "gw") -> dict[str, Path]:
    """Token files as an operator would lay them out (mode 0600)."""
    files = {
        "robots": root / "robot-tokens",
        "gateway_own": root / "gateway.token",
        "dashboard": root / "gateway-tokens",
    }
    files["robots"].write_text("".join(f"{robot} {ROBOT_TOKEN}-{robot}\n" for robot in robots))
    files["gateway_own"].write_text(GATEWAY_TOKEN + "\n")
    files["dashboard"].write_text(f"# gateway_id token\n{gateway} {GATEWAY_TOKEN}\n")
    for path in files.values():
        path.chmod(0o600)
    return files


def robot_token(robot: str) -> str:
    return f"{ROBOT_TOKEN}-{robot}"


def metric(robot: str, seq: int, boot: str = "boot-1", cpu: float = 12.5) -> dict:
    return {"robot_id": robot, "boot_id": boot, "seq": seq, "ts": "2026-11-26T10:00:00Z", "type": "metric",
            "cpu": cpu, "mem": 40.0, "version": "1.0.0", "health": "ok"}


def event(robot: str, seq: int, name: str = "installed", boot: str = "boot-1") -> dict:
    return {"robot_id": robot, "boot_id": boot, "seq": seq, "ts": "2026-11-26T10:00:00Z", "type": "event",
            "event": name, "version": "1.0.0", "detail": ""}


def post_records(url: str, robot: str, records: list[dict], timeout: float = 10) -> requests.Response:
    return requests.post(f"{url}/metrics", json={"records": records}, timeout=timeout,
                         headers={"Authorization": f"Bearer {robot_token(robot)}"})


def dashboard_records(db_path: Path) -> list[tuple]:
    """(robot_id, boot_id, seq, type) of every record the dashboard holds, in arrival order."""
    import sqlite3

    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("SELECT robot_id, boot_id, seq, type, body FROM records ORDER BY id").fetchall()
    finally:
        conn.close()
