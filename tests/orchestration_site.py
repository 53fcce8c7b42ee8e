"""One site in network namespaces for the site-orchestration tests (issue 16): a gateway, six robots, the WAN down.

    dashboard (10.233.1.1) --wan_net-- gw (10.233.1.2 | 10.233.2.1) --edge_net-- r1..r6 (10.233.2.11..16)

Every daemon is the real one, in its own namespace (tests/nsfleet.py on tests/topology.py).
The dashboard is there only to seed the gateway's cache: `seed(version)` brings the
gateway's WAN up, publishes the release with the real `otad-release`, waits until the
gateway has cached and verified it, and cuts the WAN again before any robot asked for a
lease, so every rollout is decided by the gateway and its robots alone, offline.

Each robot's app is played by three small scripts the robot daemon runs, so that what a
user would notice is on disk for the test to see (files in the test's folder, per robot):
- READY_CMD `ready.sh ROBOT`: exits with the first word of ROBOT.ready and prints the rest
  (`75 retry-after=3`); `0` by default;
- RESTART_CMD `restart.sh ROBOT`: the app stops (ROBOT.down appears), waits while ROBOT.hold
  exists (the test's lever to keep a robot mid-install, holding its lease), warms up for
  WARMUP_S, and is up again (ROBOT.down disappears);
- INHIBIT_FILE ROBOT.inhibit (created by the app during a mission).

`OutOfService` is the sampler of the issue's "Must hold": every 50 ms it finds which robots
are out of service: the app is down (ROBOT.down) or the robot is unpacking, swapping
(activating), self-testing or rolling back (its state.json phase). Each robot is read twice
in two passes and counted only if out in both: out-of-service is one stretch per install,
so every robot counted was out at the instant between the passes, and a count is never
inflated by reads at different instants.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

from fleet import robot_token
from harness import BIN, wait_until
from notify import NotifySocket
from nsfleet import NsFleet, Sampler, secret
from otad.orchestration.leases import LeaseTableError, parse_table

WAN, EDGE = "10.233.1", "10.233.2"
DASHBOARD_URL, GATEWAY_URL = f"http://{WAN}.1:8080", f"http://{EDGE}.1:8081"
GATEWAY_TOKEN = "gateway-token-site-0123456789"
ROBOTS = [f"r{n}" for n in range(1, 7)]
OUT_PHASES = ("unpacking", "activating", "selftest", "rolling_back")
WARMUP_S = 0.6  # how long the app takes to come up after a restart: installs overlap for the sampler to see
READY_RETRY_S = 30  # robots' READY_RETRY_S; the tests' ready files print a shorter retry-after
LEASE_RETRY_S = 1
# Gateway settings every scenario starts from (each test passes its own on top).
GATEWAY_BASE = {"SITE_MAX_CONCURRENT": "", "ROBOT_GROUPS": "", "MAINTENANCE_WINDOWS": "", "SITE_TIMEZONE": "Europe/Berlin",
                "LEASE_TTL_S": 20, "LEASE_RETRY_S": LEASE_RETRY_S, "INSTALL_ESTIMATE_S": 5}

READY_SH = """#!/bin/sh
# READY_CMD of robot $1: exit with the first word of $1.ready, print the rest.
read -r code said < "{root}/$1.ready" || exit 0
[ -n "$said" ] && echo "$said"
exit "$code"
"""
RESTART_SH = """#!/bin/sh
# RESTART_CMD of robot $1: the app goes down, comes up once $1.hold is gone and it has warmed up.
touch "{root}/$1.down"
while [ -e "{root}/$1.hold" ]; do sleep 0.05; done
sleep {warmup}
rm -f "{root}/$1.down"
"""


class OrchestrationSite(NsFleet):
    listeners = frozenset({"dashboard", "gw"})

    def __init__(self, root: Path, key: Path, pub: Path) -> None:
        super().__init__(root, key, pub, ["dashboard", "gw", *ROBOTS], ROBOTS)
        self.gateway_settings: dict = dict(GATEWAY_BASE)
        self.gateway_env: dict = {}
        self.major = 0  # releases are 1.0.0, 2.0.0, ...: one per rollout
        self.notify = NotifySocket(root / "gw-notify.sock")  # the gateway's sd_notify STATUS= lines
        self._notify_mark = 0

    # -- building -------------------------------------------------------------------------
    def build(self) -> "OrchestrationSite":
        self.make_hosts(("wan_net", "edge_net"))
        self._wire("dashboard", "wan0", "wan_net", "dash", f"{WAN}.1")
        self._wire("gw", "wan0", "wan_net", "gw-wan", f"{WAN}.2")
        self._wire("gw", "edge0", "edge_net", "gw-edge", f"{EDGE}.1")
        for n, robot in enumerate(ROBOTS, 11):
            self._wire(robot, "edge0", "edge_net", robot, f"{EDGE}.{n}")
        return self

    def start(self) -> "OrchestrationSite":
        root = self.root
        for name, text in (("ready.sh", READY_SH), ("restart.sh", RESTART_SH)):
            (root / name).write_text(text.format(root=root, warmup=WARMUP_S))
            (root / name).chmod(0o755)
        self._daemon("dashboard", "dashboard", "otad-dashboard", "dashboard", {
            "LISTEN": f"{WAN}.1:8080", "OTA_DIR": self.site.ota, "STATE_DIR": root / "dashboard-state", "THREADS": 4,
            "TOKENS_FILE": secret(root / "gateway-tokens", f"gw {GATEWAY_TOKEN}\n")})
        self.robot_tokens = secret(root / "robot-tokens", "".join(f"{r} {robot_token(r)}\n" for r in ROBOTS))
        self._gateway()
        for robot in ROBOTS:
            self.set_ready(robot, "0")
            self._daemon(robot, robot, "otad-robot", "robot", {
                "GATEWAY_URL": GATEWAY_URL, "TRUSTED_KEYS": self.site.pub, "ROBOT_ID": robot,
                "TOKEN_FILE": secret(root / f"{robot}.token", robot_token(robot) + "\n"),
                "STATE_DIR": self.state_dir(robot), "APP_DIR": self.app_dir(robot), "POLL_INTERVAL": 1,
                "BACKOFF_MAX": 2, "CONNECT_TIMEOUT": 2, "READ_TIMEOUT": 3, "SELFTEST_TIMEOUT": 60, "PROBATION_S": 0,
                "MAX_ATTEMPTS": 3, "RESTART_CMD": f"{root / 'restart.sh'} {robot}", "LEASES": "yes",
                "READY_CMD": f"{root / 'ready.sh'} {robot}", "READY_RETRY_S": READY_RETRY_S,
                "INHIBIT_FILE": self.inhibit_file(robot)})
        for name in self.daemons:
            self.start_daemon(name)
        return self

    def _gateway(self) -> None:
        self._daemon("gw", "gw", "otad-gateway", "gateway", {
            "DASHBOARD_URL": DASHBOARD_URL, "TRUSTED_KEYS": self.site.pub, "LISTEN": f"{EDGE}.1:8081",
            "STATE_DIR": self.root / "gw-state", "POLL_INTERVAL": 1, "BACKOFF_MAX": 2, "CONNECT_TIMEOUT": 2,
            "READ_TIMEOUT": 3, "GATEWAY_ID": "gw", "TOKEN_FILE": secret(self.root / "gw.token", GATEWAY_TOKEN + "\n"),
            "ROBOT_TOKENS_FILE": self.robot_tokens, **self.gateway_settings},
            env={**self.gateway_env, "NOTIFY_SOCKET": self.notify.path})
        self._notify_mark = len(self.notify.drain())

    def configure_gateway(self, env: dict | None = None, **settings) -> None:
        """Restart the gateway (SIGTERM) with GATEWAY_BASE + `settings`, and `env` (e.g. the clock skew)."""
        self.daemons["gw"].stop()
        self.gateway_settings = {**GATEWAY_BASE, **settings}
        self.gateway_env = dict(env or {})
        self._gateway()
        self.start_daemon("gw")

    def begin(self, env: dict | None = None, **settings) -> str:
        """A new rollout: every robot idle on the same release, ready, not inhibited, not held; the
        gateway restarted with `settings` and `env`. Returns the version to roll out (not seeded yet)."""
        self.unhold()
        for robot in ROBOTS:
            self.set_ready(robot, "0")
            self.inhibit_file(robot).unlink(missing_ok=True)
        if self.major:
            self.wait_settled(ROBOTS, f"{self.major}.0.0")
        self.configure_gateway(env, **settings)
        self.major += 1
        return f"{self.major}.0.0"

    # -- releases ---------------------------------------------------------------------------
    def seed(self, version: str) -> None:
        """The release reaches the gateway's cache over the WAN, which is then cut for the rollout."""
        self.restore_wan("gw")
        # Expires in 500 days: the gateway's test clock may run months ahead (windows across DST).
        self.site.release(version, args=("--expires-in", "500"))
        self.daemons["gw"].wait_for_log(rf"verified app {re.escape(version)}\b", 60)
        self.cut_wan("gw")
        early = [r for r in ROBOTS if self.state(r).get("phase", "idle") != "idle" or self.current(r) == version]
        assert not early and not self.journal(rf"^lease: granted lease \d+ to \S+ for {re.escape(version)} "), \
            f"{early or 'a robot'} started installing {version} before the WAN was cut"

    # -- the apps' levers ---------------------------------------------------------------------
    def set_ready(self, robot: str, answer: str) -> None:
        """What READY_CMD answers from now on: `0`, `75 retry-after=3`, ..."""
        tmp = self.root / f".{robot}.ready"
        tmp.write_text(answer + "\n")
        tmp.replace(self.root / f"{robot}.ready")

    def inhibit_file(self, robot: str) -> Path:
        return self.root / f"{robot}.inhibit"

    def hold(self, *robots: str) -> None:
        for robot in robots:
            (self.root / f"{robot}.hold").touch()

    def unhold(self, *robots: str) -> None:
        for robot in robots or ROBOTS:
            (self.root / f"{robot}.hold").unlink(missing_ok=True)

    # -- observing ---------------------------------------------------------------------------
    def app_down(self, robot: str) -> bool:
        return (self.root / f"{robot}.down").exists()

    def out_of_service(self, robot: str) -> bool:
        return self.app_down(robot) or self.state(robot).get("phase") in OUT_PHASES

    def leases(self) -> list[dict]:
        """The gateway's persisted lease table's leases ([] before it wrote one)."""
        try:
            table = parse_table((self.root / "gw-state" / "orchestration" / "leases.json").read_bytes())
        except (OSError, LeaseTableError):
            return []
        return [{"robot": l.robot_id, "lease": l.lease_id, "granted_at": l.granted_at, "expires_at": l.expires_at}
                for l in table.leases.values()]

    def update_line(self, robot: str) -> str:
        """The `update:` line of `otadctl status` on the robot (its JSON field `update`)."""
        result = subprocess.run([str(BIN / "otadctl"), "--config", str(self.daemons[robot].config), "status", "--json"],
                                capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, f"otadctl status on {robot}: {result.stderr.strip()}"
        return str(json.loads(result.stdout).get("update") or "")

    def wait_status(self, pattern: str, timeout: float = 30) -> str:
        """The gateway's STATUS= (sd_notify) since its last start, once one matches `pattern`."""
        def found():
            return next((m for m in reversed(self.notify.drain()[self._notify_mark:]) if re.search(pattern, m)), None)
        try:
            return wait_until(found, timeout, f"the gateway's STATUS= to match {pattern!r}", interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc} (last: {(self.notify.drain()[-1:] or [''])[0]!r})") from None

    def teardown(self) -> list[str]:
        left = super().teardown()
        self.notify.close()
        return left

    def journal(self, pattern: str) -> list[re.Match]:
        """The gateway's journal lines matching `pattern`, over all its runs (its log file)."""
        return list(re.finditer(pattern, self.log("gw"), re.M))


class OutOfService(Sampler):
    """Every 50 ms: which robots are out of service; more than `limit`, or a group below its
    `min_available`, is a violation. Also records, per robot, when it was first seen out (and in
    what order), and every lease the gateway's persisted table held (id -> robot, granted_at, expires_at).

    `skew`: the gateway's test clock minus time.time(): first-out times are on the gateway's clock.
    `dead`: robots the test killed. A dead robot's state.json still says it is mid-install, but it
    holds no lease once its lease expired: the budget bounds leases, so it is not counted."""

    def __init__(self, site: OrchestrationSite, limit: int | None = None,
                 groups: dict[str, tuple[set[str], int]] | None = None, interval: float = 0.05) -> None:
        super().__init__(interval)
        self.site, self.limit, self.groups = site, limit, groups or {}
        self.dead: set[str] = set()
        self.skew = 0.0
        self.most = 0
        self.first_out: dict[str, float] = {}  # robot -> when it was first seen out of service (gateway clock)
        self.order: list[str] = []
        self.seen_leases: dict[int, dict] = {}

    def sample(self) -> None:
        robots = [r for r in self.site.robot_names if r not in self.dead]
        first = {r for r in robots if self.site.out_of_service(r)}
        out = {r for r in robots if self.site.out_of_service(r)} & first
        now = time.time() + self.skew
        for lease in self.site.leases():
            known = self.seen_leases.setdefault(lease["lease"], lease)
            if known["robot"] != lease["robot"]:
                self.violations.append(f"lease {lease['lease']} was {known['robot']}'s, now {lease['robot']}'s")
            known["expires_at"] = max(known["expires_at"], lease["expires_at"])
        for robot in sorted(out):
            if robot not in self.first_out:
                self.first_out[robot] = now
                self.order.append(robot)
        self.most = max(self.most, len(out))
        if self.limit is not None and len(out) > self.limit:
            self.violations.append(f"{len(out)} robots out of service at once, more than {self.limit}: {sorted(out)}")
        for name, (members, minimum) in self.groups.items():
            working = members - out - self.dead
            if len(working) < minimum:
                self.violations.append(f"group {name} had {len(working)} robots working, fewer than min_available "
                                       f"{minimum}: {sorted(members & out)} out of service")
