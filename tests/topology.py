"""A site in network namespaces: the seed's two networks, every daemon a real process on its host.

    dashboard (wan_net 10.231.1.1) --wan_net-- gateway (wan0 10.231.1.2, edge0 10.231.2.1) --edge_net-- r1..rN (10.231.2.1x)

Each host is a network namespace; `wan_net` and `edge_net` are Linux bridges in
a further "switch" namespace, joined to the hosts by veth pairs. Nothing is
created in, or routed to, the machine's own namespace: the 10.231.x addresses
exist only inside namespaces this module creates, and deleting them removes
every bridge and veth with them. Names carry a prefix, the pid and a counter,
so a run never collides with a leftover; `cleanup_stale()` removes leftovers of
runs whose process is gone.

Daemons run as `ip netns exec NS <venv>/bin/<daemon> --config FILE`, where
FILE is the shipped `etc/otad/<name>.conf` with this site's overrides
appended. Fault levers are methods named after what they do: `cut_wan`,
`cut_edge`, `stop_dashboard`, `kill9`, `cut_download_after`, `rate_limit`, ...
Releases are built and published with the real `otad-release` CLI (fleet.Site).
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

from fleet import Site, dashboard_records, write_tokens, robot_token
from harness import BIN, Daemon, wait_until
from invariants import current_problem, current_version, robot_state

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "etc" / "otad"
PREFIX = "otadt"
WAN, EDGE = "10.231.1", "10.231.2"
DASHBOARD_IP, GATEWAY_WAN_IP, GATEWAY_EDGE_IP = f"{WAN}.1", f"{WAN}.2", f"{EDGE}.1"
DASHBOARD_URL, GATEWAY_URL = f"http://{DASHBOARD_IP}:8080", f"http://{GATEWAY_EDGE_IP}:8081"
_counter = itertools.count(1)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def skip_reason() -> str | None:
    """Why the topology cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root: network namespaces, bridges and veth pairs (ip netns) require CAP_NET_ADMIN"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    return None


def our_namespaces() -> list[str]:
    names = [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(PREFIX)]


def _owner_alive(name: str) -> bool:
    match = re.match(rf"{PREFIX}(\d+)-", name)
    return bool(match) and Path(f"/proc/{match[1]}").exists() and int(match[1]) != 0


def _delete_namespace(name: str) -> None:
    for _ in range(3):  # a process may fork while we kill: look again
        pids = [int(p) for p in ip("netns", "pids", name, check=False).stdout.split()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    ip("netns", "del", name, check=False)


def cleanup_stale() -> list[str]:
    """Remove the namespaces (and with them bridges, veths, processes) of runs that died."""
    stale = [n for n in our_namespaces() if not _owner_alive(n)]
    for name in stale:
        _delete_namespace(name)
    return stale


def make_hosts(namespaces, switch: str, bridges) -> None:
    """A network namespace per host (loopback up) and the switch's bridges."""
    for ns in namespaces:
        ip("netns", "add", ns)
        ip("-n", ns, "link", "set", "lo", "up")
    for bridge in bridges:
        ip("-n", switch, "link", "add", bridge, "type", "bridge")
        ip("-n", switch, "link", "set", bridge, "up")


def wire(switch: str, ns: str, ifname: str, bridge: str, port: str, address: str) -> None:
    """A veth pair: `port` on the switch's `bridge`, `ifname` in `ns` with `address`/24."""
    ip("-n", switch, "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", ns)
    ip("-n", switch, "link", "set", port, "master", bridge)
    ip("-n", switch, "link", "set", port, "up")
    ip("-n", ns, "addr", "add", f"{address}/24", "dev", ifname)
    ip("-n", ns, "link", "set", ifname, "up")


def remove_all(daemons, namespaces, tag: str) -> list[str]:
    """Kill the daemons, delete the namespaces; the namespaces of `tag` still there (expect [])."""
    for daemon in daemons:
        if daemon.running():
            daemon.kill9()
    for ns in namespaces:
        _delete_namespace(ns)
    return [f"namespace {n}" for n in our_namespaces() if n.startswith(tag + "-")]


class NsDaemon(Daemon):
    """harness.Daemon, started inside a network namespace."""

    def __init__(self, ns: str, name: str, command: str, config: Path, log: Path, **kwargs) -> None:
        super().__init__(command, config, log, **kwargs)
        self.ns, self.name = ns, name

    def start(self, wait_listening: bool = True, timeout: float = 30) -> "NsDaemon":
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, str(BIN / self.command), "--config", str(self.config), *self.args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env,
            )
        if wait_listening:
            self.url = self.wait_for_log(r"listening on (http://\S+)", timeout)[1]
        return self


def shipped_config(name: str, target: Path, overrides: dict[str, object]) -> Path:
    """The shipped etc/otad/<name>.conf with `overrides` appended (later lines win nothing: keys are unique)."""
    text = (SHIPPED / f"{name}.conf").read_text()
    target.write_text(text + "\n# --- test overrides ---\n" + "".join(f"{k}={v}\n" for k, v in overrides.items()))
    return target


class RobotFiles:
    """Where each robot of a topology keeps its app and state (under `self.root`), and what they say:
    shared by Topology and nsfleet.NsFleet."""

    root: Path

    def app_dir(self, robot: str) -> Path:
        return self.root / f"{robot}-app"

    def state_dir(self, robot: str) -> Path:
        return self.root / f"{robot}-state"

    def current(self, robot: str) -> str | None:
        return current_version(self.app_dir(robot))

    def state(self, robot: str) -> dict:
        """The robot's state.json ({} while it cannot be read, e.g. before its first write)."""
        try:
            return robot_state(self.state_dir(robot))
        except (OSError, ValueError):
            return {}


class Topology(RobotFiles):
    def __init__(self, root: Path, key: Path, pub: Path, robots: int = 3, robot_overrides: dict | None = None,
                 gateway_overrides: dict | None = None) -> None:
        self.root = root
        self.tag = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self.site = Site(root, key, pub)
        self.robot_names = [f"r{i}" for i in range(1, robots + 1)]
        self.ns = {host: f"{self.tag}-{host}" for host in ["sw", "dashboard", "gateway", *self.robot_names]}
        self.tokens = write_tokens(root, self.robot_names)
        self.daemons: dict[str, NsDaemon] = {}
        self.started: list[subprocess.Popen] = []
        self._robot_overrides = robot_overrides or {}
        self._gateway_overrides = gateway_overrides or {}
        self.faults: dict[str, int] = {}

    # -- building -------------------------------------------------------------------
    def build(self) -> "Topology":
        make_hosts(self.ns.values(), self.ns["sw"], ("wan_net", "edge_net"))
        self._wire("dashboard", "wan0", "wan_net", "dash", DASHBOARD_IP)
        self._wire("gateway", "wan0", "wan_net", "gw-wan", GATEWAY_WAN_IP)
        self._wire("gateway", "edge0", "edge_net", "gw-edge", GATEWAY_EDGE_IP)
        for number, robot in enumerate(self.robot_names, 1):
            self._wire(robot, "edge0", "edge_net", robot, f"{EDGE}.{10 + number}")
        return self

    def _wire(self, host: str, ifname: str, bridge: str, port: str, address: str) -> None:
        wire(self.ns["sw"], self.ns[host], ifname, bridge, port, address)

    # -- daemons ----------------------------------------------------------------------
    def _daemon(self, name: str, host: str, command: str, conf: str, overrides: dict, env: dict | None = None) -> NsDaemon:
        config = shipped_config(conf, self.root / f"{name}.conf", overrides)
        daemon = NsDaemon(self.ns[host], name, command, config, self.root / f"{name}.log", env=env)
        self.daemons[name] = daemon
        return daemon

    def start(self) -> "Topology":
        site = self.site
        self._daemon("dashboard", "dashboard", "otad-dashboard", "dashboard", {
            "LISTEN": f"{DASHBOARD_IP}:8080", "OTA_DIR": site.ota, "STATE_DIR": self.root / "dashboard-state",
            "TOKENS_FILE": self.tokens["dashboard"], "THREADS": 4})
        self._daemon("gateway", "gateway", "otad-gateway", "gateway", {
            "DASHBOARD_URL": DASHBOARD_URL, "TRUSTED_KEYS": site.pub, "LISTEN": f"{GATEWAY_EDGE_IP}:8081",
            "STATE_DIR": self.root / "gateway-state", "POLL_INTERVAL": 1, "BACKOFF_MAX": 4, "CONNECT_TIMEOUT": 2,
            "READ_TIMEOUT": 3, "GATEWAY_ID": "gw", "TOKEN_FILE": self.tokens["gateway_own"],
            "ROBOT_TOKENS_FILE": self.tokens["robots"], "FORWARD_BATCH": 200, **self._gateway_overrides})
        for robot in self.robot_names:
            self._daemon(robot, robot, "otad-robot", "robot", {
                "GATEWAY_URL": GATEWAY_URL, "TRUSTED_KEYS": site.pub, "ROBOT_ID": robot,
                "STATE_DIR": self.state_dir(robot), "APP_DIR": self.app_dir(robot), "POLL_INTERVAL": 1,
                "BACKOFF_MAX": 4, "CONNECT_TIMEOUT": 2, "READ_TIMEOUT": 3, "SELFTEST_TIMEOUT": 10, "PROBATION_S": 0,
                "MAX_ATTEMPTS": 3, "RESTART_CMD": f"echo restarted $OTAD_VERSION >> {self.root / f'{robot}-restarts.log'}",
                **self._robot_overrides})
            token = self.root / f"{robot}-agent.token"
            token.write_text(robot_token(robot) + "\n")
            token.chmod(0o600)
            self._daemon(f"{robot}-agent", robot, "telemetry-agent", "telemetry-agent", {
                "GATEWAY_URL": GATEWAY_URL, "ROBOT_ID": robot, "INTERVAL": 1, "TOKEN_FILE": token,
                "STATE_DIR": self.root / f"{robot}-agent-state", "APP_DIR": self.app_dir(robot),
                "ROBOT_STATE_DIR": self.state_dir(robot), "BACKOFF_MAX": 4, "CONNECT_TIMEOUT": 2, "READ_TIMEOUT": 3})
        for name in self.daemons:
            self.start_daemon(name)
        return self

    def start_daemon(self, name: str, env: dict | None = None) -> NsDaemon:
        daemon = self.daemons[name]
        if daemon.running():
            return daemon
        daemon.env = {**daemon.env, **(env or {})}
        daemon.start(wait_listening=name in ("dashboard", "gateway"))
        self.started.append(daemon.proc)
        if name in self.robot_names:
            daemon.wait_for_log("recovered: CURRENT is app")
        return daemon

    # -- fault levers -----------------------------------------------------------------
    def _count(self, kind: str) -> None:
        self.faults[kind] = self.faults.get(kind, 0) + 1

    def _link(self, host: str, ifname: str, state: str) -> None:
        ip("-n", self.ns[host], "link", "set", ifname, state)

    def cut_wan(self) -> None:
        """The gateway's WAN side goes down: it cannot reach the dashboard, robots still reach it."""
        self._count("wan cut")
        self._link("gateway", "wan0", "down")

    def restore_wan(self) -> None:
        self._link("gateway", "wan0", "up")

    def cut_edge(self, robot: str) -> None:
        self._count("edge cut")
        self._link(robot, "edge0", "down")

    def restore_edge(self, robot: str) -> None:
        self._link(robot, "edge0", "up")

    def link_up(self, host: str, ifname: str) -> bool:
        doc = json.loads(ip("-j", "-n", self.ns[host], "link", "show", "dev", ifname).stdout)
        return "UP" in doc[0]["flags"]

    def stop_dashboard(self) -> None:
        self._count("dashboard stop")
        self.daemons["dashboard"].stop()

    def start_dashboard(self) -> None:
        self.start_daemon("dashboard")

    def kill9(self, name: str, kind: str = "") -> None:
        self._count(f"kill -9 {self.daemons[name].command}{kind}")
        self.daemons[name].kill9()

    def restart(self, name: str, env: dict | None = None) -> NsDaemon:
        self.daemons[name].kill9()
        return self.start_daemon(name, env)

    def rate_limit(self, host: str, rate: str | None) -> None:
        """Limit what the switch sends to `host` (its downloads) to `rate` (e.g. '4mbit'); None: unlimited."""
        port = {"gateway": "gw-wan", "dashboard": "dash"}.get(host, host)
        sw = self.ns["sw"]
        ip_tc = ["tc", "-n", sw, "qdisc"]
        subprocess.run([*ip_tc, "del", "dev", port, "root"], capture_output=True, timeout=10)
        if rate:
            subprocess.run([*ip_tc, "add", "dev", port, "root", "tbf", "rate", rate, "burst", "16kb", "latency", "2s"],
                           check=True, capture_output=True, timeout=10)

    def rx_bytes(self, host: str, ifname: str) -> int:
        doc = json.loads(ip("-j", "-s", "-n", self.ns[host], "link", "show", "dev", ifname).stdout)
        return int(doc[0]["stats64"]["rx"]["bytes"])

    def cut_download_after(self, host: str, nbytes: int, down_for: float, timeout: float = 60) -> "LinkFlap":
        """Cut `host`'s link once it has received `nbytes` more bytes, restore it `down_for` seconds later."""
        ifname = "wan0" if host == "gateway" else "edge0"
        return LinkFlap(self, host, ifname, nbytes, down_for, timeout)

    # -- releases ---------------------------------------------------------------------
    def release(self, version: str, **build) -> dict:
        return self.site.release(version, **build)

    def publish_failing(self, version: str, why: str = "echo 'arm calibration failed' >&2; exit 3") -> dict:
        return self.site.release(version, selftest=why)

    def publish_tampered(self, version: str) -> dict:
        """A correctly signed release whose artifact was changed afterwards (same size).

        `otad-release publish` refuses such a release, so this lays the files out
        as a compromised mirror would: artifacts first, the manifest last by rename.
        """
        out = self.site.build(version)
        manifest = json.loads((out / "manifest.json").read_text())
        flip_byte(out / manifest["artifact"])
        self._publish_by_hand(out, [p.name for p in out.iterdir()])
        return manifest

    def publish_unknown_key(self, version: str, stranger_key: Path) -> dict:
        return self.site.publish(self.site.build(version, key=stranger_key))

    def publish_without_artifact(self, version: str) -> tuple[dict, Path]:
        """The manifest, bundle and checksum, but not the tar.gz: every download of it fails (404)."""
        out = self.site.build(version)
        manifest = json.loads((out / "manifest.json").read_text())
        self._publish_by_hand(out, [p.name for p in out.iterdir() if p.name != manifest["artifact"]])
        return manifest, out / manifest["artifact"]

    def _publish_by_hand(self, out: Path, names: list[str]) -> None:
        """Every release file of `out` in `names` first, the manifest last by rename (as publish does)."""
        for name in sorted(names):
            if name != "manifest.json":
                shutil.copy(out / name, self.site.ota / name)
        tmp = self.site.ota / ".manifest.json.tmp"
        shutil.copy(out / "manifest.json", tmp)
        os.replace(tmp, self.site.ota / "manifest.json")

    # -- observing: RobotFiles --------------------------------------------------------

    def settled_on(self, version: str) -> bool:
        return all(self.current(r) == version and self.state(r).get("phase") == "idle" for r in self.robot_names)

    def log(self, name: str) -> str:
        return self.daemons[name].log()

    def http_get(self, host: str, url: str) -> tuple[int, bytes]:
        """GET from inside a namespace (the test itself lives in none of them)."""
        result = subprocess.run(["ip", "netns", "exec", self.ns[host], "curl", "-s", "-m", "5", "-o", "-", "-w",
                                 "\n%{http_code}", url], capture_output=True, timeout=15)
        body, _, code = result.stdout.rpartition(b"\n")
        return int(code or 0), body

    def status_json(self) -> dict:
        code, body = self.http_get("dashboard", f"{DASHBOARD_URL}/status.json")
        assert code == 200, f"/status.json answered {code}: {body[:200]!r}"
        return json.loads(body)

    def dashboard_rows(self) -> list[tuple]:
        db = self.root / "dashboard-state" / "telemetry.db"
        return dashboard_records(db) if db.exists() else []

    def gateway_backlog(self) -> int:
        return _count_rows(self.root / "gateway-state" / "telemetry.db", "SELECT count(*) FROM records")

    def agent_issued(self, robot: str) -> int:
        """How many seq numbers the robot's agent has handed out (seqs start above the boot clock, not at 1)."""
        return _count_rows(self.root / f"{robot}-agent-state" / "spool.db", "SELECT coalesce(sum(issued), 0) FROM counters")

    def agent_pending(self, robot: str) -> list[int]:
        """seqs still in the agent's spool: not yet acknowledged by the gateway."""
        path = self.root / f"{robot}-agent-state" / "spool.db"
        rows = _query(path, "SELECT body FROM records ORDER BY id")
        return [json.loads(body)["seq"] for (body,) in rows]

    # -- teardown ---------------------------------------------------------------------
    def teardown(self) -> list[str]:
        """Kill every process, delete every namespace; return what could not be removed (expect [])."""
        left = remove_all(self.daemons.values(), self.ns.values(), self.tag)
        left += [f"process {p.pid} ({p.args[4]})" for p in self.started if p.poll() is None]
        return left


class LinkFlap:
    """A thread that takes a link down after N received bytes (from its kernel counter), then up again."""

    def __init__(self, topo: Topology, host: str, ifname: str, nbytes: int, down_for: float, timeout: float) -> None:
        self.topo, self.host, self.ifname = topo, host, ifname
        self.start_bytes = topo.rx_bytes(host, ifname)
        self.nbytes, self.down_for, self.timeout = nbytes, down_for, timeout
        self.cut_at: int | None = None
        self.restored = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.timeout
        try:
            while time.monotonic() < deadline:
                received = self.topo.rx_bytes(self.host, self.ifname) - self.start_bytes
                if received >= self.nbytes:
                    self.topo._link(self.host, self.ifname, "down")
                    self.topo._count("link cut after N bytes")
                    self.cut_at = received
                    time.sleep(self.down_for)
                    return
                time.sleep(0.02)
        finally:
            self.topo._link(self.host, self.ifname, "up")
            self.restored.set()

    def wait(self, timeout: float = 90) -> int:
        assert self.restored.wait(timeout), "the link flap did not finish"
        assert self.cut_at is not None, f"{self.host} never received {self.nbytes} bytes: nothing was cut"
        return self.cut_at


class CurrentSampler:
    """Samples every robot's CURRENT every `interval` s in a thread: complete, and a verified release.

    `verified` is the set of sha256s of releases signed with the trusted key and
    published intact; a completion marker holds the sha256 of the artifact the
    tree came from, so a CURRENT whose marker names anything else is unverified.
    A sample that raced a link swap (CURRENT changed while it was checked) is
    taken again rather than judged.
    """

    def __init__(self, topo: Topology, interval: float = 0.05) -> None:
        self.topo, self.interval = topo, interval
        self.verified: set[str] = set()
        self.forbidden: set[str] = set()  # versions that must never appear on disk (tampered, unknown key)
        self.problems: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "CurrentSampler":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            for robot in self.topo.robot_names:
                problem = self.check(robot)
                if problem:
                    self.problems.append(f"{robot}: {problem}")
            self.samples += 1
            self._stop.wait(self.interval)

    def check(self, robot: str) -> str | None:
        app = self.topo.app_dir(robot)
        for _ in range(5):
            before = _readlink(app / "CURRENT")
            problem = current_problem(app, allow_none=True) or self._unverified(app, before)
            problem = problem or self._forbidden_on_disk(app)
            if problem is None or _readlink(app / "CURRENT") == before:
                return problem
        return problem

    def _unverified(self, app: Path, target: str | None) -> str | None:
        if target is None:
            return None
        version = target.partition("/")[2]
        try:
            sha = (app / "releases" / f"{version}.ok").read_text().strip()
        except OSError:
            return None  # gone since current_problem looked: the link moved, judged on the retry
        return None if sha in self.verified else f"CURRENT -> {version}, not a verified release (sha256 {sha[:12]})"

    def _forbidden_on_disk(self, app: Path) -> str | None:
        for version in self.forbidden:
            if (app / "releases" / version).exists():
                return f"release {version} (tampered or unknown key) was unpacked"
        return None


def flip_byte(path: Path, offset: int = -100) -> None:
    """Change one byte in place (bit rot, or an attacker who keeps the size)."""
    with open(path, "r+b") as stream:
        stream.seek(offset, os.SEEK_END)
        byte = stream.read(1)
        stream.seek(-1, os.SEEK_CUR)
        stream.write(bytes([byte[0] ^ 0xFF]))


def _readlink(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _query(path: Path, sql: str) -> list[tuple]:
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _count_rows(path: Path, sql: str) -> int:
    rows = _query(path, sql)
    return int(rows[0][0]) if rows else 0


def seqs_by_robot(rows: list[tuple]) -> dict[str, list[int]]:
    """Dashboard rows -> each robot's seqs in arrival order (gap rows left out)."""
    found: dict[str, list[int]] = {}
    for robot, _boot, seq, kind, _body in rows:
        if kind != "gap":
            found.setdefault(robot, []).append(seq)
    return found


def wait_settled(topo: Topology, version: str, timeout: float = 60) -> None:
    wait_until(lambda: topo.settled_on(version), timeout,
               f"every robot idle on {version} (now {[(r, topo.current(r), topo.state(r).get('phase')) for r in topo.robot_names]})",
               interval=0.1)
