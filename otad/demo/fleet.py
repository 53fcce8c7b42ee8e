"""A whole fleet on loopback: dashboard, a WAN, one gateway, a site network, three robots with agents.

Real daemons, real config files and token files (docs/formats.md), all state
under one folder. The WAN (gateway -> dashboard) and the site network
(robots and agents -> gateway) are FaultProxy instances in the demo's own
process: the WAN so the demo can take it down, the site network so it has a
finite speed and a download takes long enough to watch.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from otad.demo.faultproxy import FaultProxy
from otad.demo.procs import Child, StatusSocket, stop_all

GATEWAY_ID = "site-gw"
ROBOTS = ("robot-1", "robot-2", "robot-3")
SITE_BYTES_PER_S = 2 * 1024 * 1024  # per connection: a 3 MiB release takes about 1.5 s


def write_config(path: Path, values: dict[str, object]) -> Path:
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    return path


def write_secret(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


@dataclass
class RobotPaths:
    robot_id: str
    state_dir: Path
    app_dir: Path
    config: Path


class Fleet:
    def __init__(self, root: Path, pub: Path, env: dict[str, str], dashboard_port: int = 0) -> None:
        self.root, self.pub, self.env = root, pub, env
        self.ota = root / "ota"
        self.ota.mkdir(exist_ok=True)
        self.logs = root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.dashboard_port = dashboard_port
        self.children: list[Child] = []
        self.proxies: list[FaultProxy] = []
        self.robots: dict[str, RobotPaths] = {}
        self.gateway: Child | None = None
        self.dashboard: Child | None = None
        self.wan: FaultProxy | None = None
        self.site: FaultProxy | None = None

    # -- start ----------------------------------------------------------------------
    def start(self) -> None:
        tokens = self._tokens()
        self.dashboard = self._spawn("dashboard", "otad-dashboard", {
            "LISTEN": f"127.0.0.1:{self.dashboard_port}", "OTA_DIR": self.ota, "STATE_DIR": self.root / "dashboard",
            "TOKENS_FILE": tokens["dashboard"], "THREADS": 4,
        })
        self.dashboard.wait_listening()
        self.wan = self._proxy(self.dashboard.url)
        self.gateway = self._spawn(GATEWAY_ID, "otad-gateway", {
            "DASHBOARD_URL": self.wan.url, "TRUSTED_KEYS": self.pub, "LISTEN": "127.0.0.1:0",
            "STATE_DIR": self.root / GATEWAY_ID, "GATEWAY_ID": GATEWAY_ID, "POLL_INTERVAL": 1, "BACKOFF_MAX": 2,
            "CONNECT_TIMEOUT": 2, "READ_TIMEOUT": 5, "TOKEN_FILE": tokens["gateway_own"],
            "ROBOT_TOKENS_FILE": tokens["robots"],
        }, status=True)
        self.gateway.wait_listening()
        self.site = self._proxy(self.gateway.url)
        self.site.throttle(SITE_BYTES_PER_S)
        for robot_id in ROBOTS:
            self._start_robot(robot_id, tokens[robot_id])

    def _start_robot(self, robot_id: str, token_file: Path) -> None:
        state_dir, app_dir = self.root / robot_id / "state", self.root / robot_id / "app"
        agent_dir = self.root / robot_id / "agent"
        app_dir.mkdir(parents=True, exist_ok=True)
        self._spawn(robot_id, "otad-robot", {
            "GATEWAY_URL": self.site.url, "TRUSTED_KEYS": self.pub, "ROBOT_ID": robot_id, "STATE_DIR": state_dir,
            "APP_DIR": app_dir, "POLL_INTERVAL": 1, "BACKOFF_MAX": 2, "CONNECT_TIMEOUT": 2, "READ_TIMEOUT": 5,
            "SELFTEST_TIMEOUT": 10, "PROBATION_S": 0,
            # One failed self-test blacklists a version, so the demo's bad release is refused at once.
            "MAX_ATTEMPTS": 1,
            "RESTART_CMD": f"echo restarted app $OTAD_VERSION >> {self.logs / (robot_id + '-app.log')}",
        })
        self._spawn(f"{robot_id}-agent", "telemetry-agent", {
            "GATEWAY_URL": self.site.url, "ROBOT_ID": robot_id, "INTERVAL": 1, "TOKEN_FILE": token_file,
            "STATE_DIR": agent_dir, "APP_DIR": app_dir, "ROBOT_STATE_DIR": state_dir,
            "HEALTH_CMD": f"test -x {app_dir}/CURRENT/bin/robot-app", "BACKOFF_MAX": 2, "CONNECT_TIMEOUT": 2,
            "READ_TIMEOUT": 3,
        })
        self.robots[robot_id] = RobotPaths(robot_id, state_dir, app_dir, self.root / "etc" / f"{robot_id}.conf")

    def _tokens(self) -> dict[str, Path]:
        """Token files as an operator lays them out: each side holds only what it needs."""
        etc = self.root / "etc"
        etc.mkdir(exist_ok=True)
        gateway_token = secrets.token_urlsafe(24)
        robot_tokens = {robot: secrets.token_urlsafe(24) for robot in ROBOTS}
        files = {
            "dashboard": write_secret(etc / "dashboard-gateway-tokens", f"# gateway_id token\n{GATEWAY_ID} {gateway_token}\n"),
            "gateway_own": write_secret(etc / "gateway.token", gateway_token + "\n"),
            "robots": write_secret(etc / "gateway-robot-tokens",
                                   "# robot_id token\n" + "".join(f"{r} {t}\n" for r, t in robot_tokens.items())),
        }
        for robot, token in robot_tokens.items():
            files[robot] = write_secret(etc / f"{robot}-agent.token", token + "\n")
        return files

    def _spawn(self, name: str, command: str, values: dict[str, object], status: bool = False) -> Child:
        etc = self.root / "etc"
        etc.mkdir(exist_ok=True)
        config = write_config(etc / f"{name}.conf", values)
        listener = StatusSocket(name) if status else None
        child = Child(name, command, config, self.logs / f"{name}.log", self.env, listener)
        self.children.append(child)
        return child

    def _proxy(self, upstream_url: str) -> FaultProxy:
        proxy = FaultProxy(_address(upstream_url))
        self.proxies.append(proxy)
        return proxy

    # -- watch and stop ---------------------------------------------------------------
    def dead(self) -> list[str]:
        """Daemons that exited although nobody asked them to."""
        return [f"{c.name} (exit {c.proc.returncode})" for c in self.children if not c.running()]

    def stop(self) -> list[str]:
        """Robots and agents first, then the gateway, then the dashboard: each tier's peer is still up while it stops."""
        last = [c for c in (self.gateway, self.dashboard) if c is not None]
        forced = stop_all([c for c in self.children if c not in last])
        for child in last:
            forced += stop_all([child])
        for proxy in self.proxies:
            proxy.close()
        return forced

