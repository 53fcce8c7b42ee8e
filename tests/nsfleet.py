"""What every fleet in network namespaces shares: hosts, daemons on them, fault levers, robots observed.

tests/rollout_fleet.py (a dashboard and two sites) and tests/orchestration_site.py (one
site of six robots) build their topologies from these pieces, on tests/topology.py's
`make_hosts`, `wire`, `NsDaemon` and shipped configs; names carry its prefix, so
`cleanup_stale` removes leftovers. `Sampler` is the continuous check both use: a thread
that looks at the fleet every 50 ms for the whole test and collects what it found wrong.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

from fleet import Site
from harness import wait_until
from topology import PREFIX, NsDaemon, RobotFiles, _counter, ip, make_hosts, remove_all, shipped_config, wire


def secret(path: Path, text: str) -> Path:
    """A token file as an operator lays it out (mode 0600)."""
    path.write_text(text)
    path.chmod(0o600)
    return path


class NsFleet(RobotFiles):
    """Hosts (a namespace each) on switch bridges, daemons by name; subclasses say which hosts and daemons."""

    listeners: frozenset[str] = frozenset()  # daemons started only once they log `listening on`

    def __init__(self, root: Path, key: Path, pub: Path, hosts: list[str], robots: list[str]) -> None:
        self.root = root
        self.tag = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self.site = Site(root, key, pub)
        self.robot_names = list(robots)
        self.ns = {host: f"{self.tag}-{host}" for host in ["sw", *hosts]}
        self.daemons: dict[str, NsDaemon] = {}

    # -- building -------------------------------------------------------------------------
    def make_hosts(self, bridges) -> None:
        make_hosts(self.ns.values(), self.ns["sw"], bridges)

    def _wire(self, host: str, ifname: str, bridge: str, port: str, address: str) -> None:
        wire(self.ns["sw"], self.ns[host], ifname, bridge, port, address)

    def _daemon(self, name: str, host: str, command: str, conf: str, overrides: dict, env: dict | None = None) -> NsDaemon:
        config = shipped_config(conf, self.root / f"{name}.conf", overrides)
        self.daemons[name] = NsDaemon(self.ns[host], name, command, config, self.root / f"{name}.log", env=env)
        return self.daemons[name]

    # -- running ------------------------------------------------------------------------------
    def start_daemon(self, name: str, env: dict | None = None) -> NsDaemon:
        daemon = self.daemons[name]
        if not daemon.running():
            daemon.env = {**daemon.env, **(env or {})}
            daemon.start(wait_listening=name in self.listeners, timeout=60)
            if name in self.robot_names:
                daemon.wait_for_log("recovered: CURRENT is app", 60)
        return daemon

    def restart(self, name: str, env: dict | None = None) -> NsDaemon:
        self.daemons[name].kill9()
        return self.start_daemon(name, env)

    # -- faults ------------------------------------------------------------------------------
    def cut_wan(self, gw: str) -> None:
        ip("-n", self.ns[gw], "link", "set", "wan0", "down")

    def restore_wan(self, gw: str) -> None:
        ip("-n", self.ns[gw], "link", "set", "wan0", "up")

    def cut_edge(self, robot: str) -> None:
        ip("-n", self.ns[robot], "link", "set", "edge0", "down")

    def restore_edge(self, robot: str) -> None:
        ip("-n", self.ns[robot], "link", "set", "edge0", "up")

    # -- observing ---------------------------------------------------------------------------
    # app_dir, state_dir, current, state: topology.RobotFiles

    def settled(self, robot: str, version: str) -> bool:
        return self.state(robot).get("phase") == "idle" and self.current(robot) == version

    def wait_settled(self, robots, version: str, timeout: float = 120) -> None:
        robots = list(robots)
        wait_until(lambda: all(self.settled(r, version) for r in robots), timeout,
                   f"{robots} to settle on {version} (now: {[self.current(r) for r in robots]})", interval=0.2)

    def log(self, name: str) -> str:
        return self.daemons[name].log()

    def teardown(self) -> list[str]:
        """Kill every process, delete every namespace; return what could not be removed (expect [])."""
        return remove_all(self.daemons.values(), self.ns.values(), self.tag)


class Sampler:
    """Calls `sample()` every `interval` s in a thread until `stop()`; `sample` appends to `violations`.

    A sample that raises is a violation too (the thread never dies silently)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.violations: list[str] = []
        self.samples = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> list[str]:
        self._done.set()
        self._thread.join(30)
        return self.violations

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                self.sample()
            except Exception as exc:  # a broken check must fail the test, not stop checking quietly
                self.violations.append(f"the sampler failed: {type(exc).__name__}: {exc}")
            self.samples += 1
