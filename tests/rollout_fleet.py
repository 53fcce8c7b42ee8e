"""A fleet in network namespaces for the rollout tests: one dashboard, two sites, every daemon real.

    dashboard (10.232.1.1) --wan_net-- gwa (10.232.1.2 | 10.232.2.1) --edge_a-- a1..aN (10.232.2.1x)
                                   \\-- gwb (10.232.1.3 | 10.232.3.1) --edge_b-- b1..bN (10.232.3.1x)

The same construction as tests/orchestration_site.py (tests/nsfleet.py's `NsFleet` on
tests/topology.py), with a site per gateway. The dashboard holds the rollout key; gateways and robots
trust its public half (ROLLOUT_KEYS); every robot runs with its telemetry
agent, whose POST /metrics is how update events reach the gateway. Operators
act with the real `otad-release rollout` CLI, run inside the dashboard's
namespace (the test itself lives in none of them).

`PhaseSampler` is the continuous check of "no robot outside the current
phases installs": every 50 ms it reads each robot's CURRENT and, when that is
a rollout's target, asks the robot's gateway's persisted site state whether
the robot's phase has started there. A gateway persists a phase start before
it serves the phase's robots (otad/gateway/rollouts.py), and start times only
grow, so reading CURRENT first and the site state second never misses.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from fleet import robot_token
from harness import BIN
from nsfleet import NsFleet, Sampler, secret as _secret
from otad.rollout.cohort import phase_of
from otad.rollout.plan import Plan, plan_from_doc

WAN = "10.232.1"
DASHBOARD_URL = f"http://{WAN}.1:8080"
OPERATOR_TOKEN = "operator-token-0123456789"
SITES = {"gwa": ("a", 2), "gwb": ("b", 3)}  # gateway id -> (robot prefix, third octet of its edge_net)


def gateway_token(gateway: str) -> str:
    return f"gateway-token-{gateway}-0123456789"


class RolloutFleet(NsFleet):
    listeners = frozenset({"dashboard", *SITES})

    def __init__(self, root: Path, key: Path, pub: Path, rollout_keys: Path, robots_per_site: int = 5) -> None:
        self.rollout_keys = rollout_keys
        self.robots = {gw: [f"{prefix}{n}" for n in range(1, robots_per_site + 1)] for gw, (prefix, _) in SITES.items()}
        self.gateway_of = {robot: gw for gw, robots in self.robots.items() for robot in robots}
        super().__init__(root, key, pub, ["dashboard", *SITES, *self.gateway_of], list(self.gateway_of))
        self.plans: dict[str, Plan] = {}  # rollout_id -> revision 1, as created (cohorts never change)

    # -- building -------------------------------------------------------------------------
    def build(self) -> "RolloutFleet":
        self.make_hosts(("wan_net", *(f"edge_{p}" for p, _ in SITES.values())))
        self._wire("dashboard", "wan0", "wan_net", "dash", f"{WAN}.1")
        for n, (gw, (prefix, octet)) in enumerate(SITES.items(), 2):
            self._wire(gw, "wan0", "wan_net", f"{gw}-wan", f"{WAN}.{n}")
            self._wire(gw, "edge0", f"edge_{prefix}", f"{gw}-edge", f"10.232.{octet}.1")
            for m, robot in enumerate(self.robots[gw], 1):
                self._wire(robot, "edge0", f"edge_{prefix}", robot, f"10.232.{octet}.{10 + m}")
        return self

    # -- daemons ----------------------------------------------------------------------------
    def start(self, gateway_overrides: dict | None = None) -> "RolloutFleet":
        root = self.root
        tokens = _secret(root / "gateway-tokens", "".join(f"{gw} {gateway_token(gw)}\n" for gw in SITES))
        operators = _secret(root / "operator-tokens", f"alice {OPERATOR_TOKEN}\n")
        self.operator_file = _secret(root / "alice.token", OPERATOR_TOKEN + "\n")
        self._daemon("dashboard", "dashboard", "otad-dashboard", "dashboard", {
            "LISTEN": f"{WAN}.1:8080", "OTA_DIR": self.site.ota, "STATE_DIR": root / "dashboard-state",
            "TOKENS_FILE": tokens, "THREADS": 4, "OPERATOR_TOKENS_FILE": operators,
            "ROLLOUT_KEY": self.rollout_keys / "rollout.key", "ROLLOUT_CHECK_INTERVAL": 1},
            env={"OTAD_ROLLOUT_KEY_PASSWORD": "test-password"})
        for gw, (_, octet) in SITES.items():
            robots = _secret(root / f"{gw}-robot-tokens", "".join(f"{r} {robot_token(r)}\n" for r in self.robots[gw]))
            self._daemon(gw, gw, "otad-gateway", "gateway", {
                "DASHBOARD_URL": DASHBOARD_URL, "TRUSTED_KEYS": self.site.pub, "LISTEN": f"10.232.{octet}.1:8081",
                "STATE_DIR": root / f"{gw}-state", "POLL_INTERVAL": 1, "BACKOFF_MAX": 2, "CONNECT_TIMEOUT": 2,
                "READ_TIMEOUT": 3, "GATEWAY_ID": gw, "TOKEN_FILE": _secret(root / f"{gw}.token", gateway_token(gw) + "\n"),
                "ROBOT_TOKENS_FILE": robots, "FORWARD_BATCH": 200, "ROLLOUT_KEYS": self.rollout_keys / "rollout.pub",
                **(gateway_overrides or {})})
            for robot in self.robots[gw]:
                self._robot(robot, f"http://10.232.{octet}.1:8081")
        for name in self.daemons:
            self.start_daemon(name)
        return self

    def _robot(self, robot: str, gateway_url: str) -> None:
        token = _secret(self.root / f"{robot}.token", robot_token(robot) + "\n")
        self._daemon(robot, robot, "otad-robot", "robot", {
            "GATEWAY_URL": gateway_url, "TRUSTED_KEYS": self.site.pub, "ROBOT_ID": robot, "TOKEN_FILE": token,
            "ROLLOUT_KEYS": self.rollout_keys / "rollout.pub", "STATE_DIR": self.state_dir(robot),
            "APP_DIR": self.app_dir(robot), "POLL_INTERVAL": 1, "BACKOFF_MAX": 2, "CONNECT_TIMEOUT": 2, "READ_TIMEOUT": 3,
            "SELFTEST_TIMEOUT": 10, "PROBATION_S": 0, "MAX_ATTEMPTS": 3, "RESTART_CMD": "true"})
        self._daemon(f"{robot}-agent", robot, "telemetry-agent", "telemetry-agent", {
            "GATEWAY_URL": gateway_url, "ROBOT_ID": robot, "INTERVAL": 1, "TOKEN_FILE": token,
            "STATE_DIR": self.root / f"{robot}-agent-state", "APP_DIR": self.app_dir(robot),
            "ROBOT_STATE_DIR": self.state_dir(robot), "BACKOFF_MAX": 2, "CONNECT_TIMEOUT": 2, "READ_TIMEOUT": 3})

    # -- operators ----------------------------------------------------------------------------
    def rollout(self, *args: str) -> subprocess.CompletedProcess:
        """`otad-release rollout ARGS` as an operator at the dashboard runs it; asserts exit 0."""
        result = subprocess.run(["ip", "netns", "exec", self.ns["dashboard"], str(BIN / "otad-release"), "rollout",
                                 *args, "--dashboard", DASHBOARD_URL, "--token-file", str(self.operator_file)],
                                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, f"otad-release rollout {' '.join(args)}: {result.stderr.strip()}"
        return result

    def create(self, fields: dict) -> Plan:
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 30 * 86400))
        doc = {"expires": expires, "install_timeout_s": 300, **fields}
        path = self.root / f"plan-{doc['rollout_id']}.json"
        path.write_text(json.dumps(doc))
        self.rollout("create", str(path))
        plan = plan_from_doc({"schema": 1, "revision": 1, **doc})
        self.plans[plan.rollout_id] = plan
        return plan

    def status(self, rollout_id: str) -> dict:
        return json.loads(self.rollout("status", rollout_id, "--json").stdout)

    # -- observing ---------------------------------------------------------------------------
    def site_rollout(self, gw: str, rollout_id: str) -> dict:
        """The gateway's persisted record of one rollout ({} before it took the plan)."""
        try:
            doc = json.loads((self.root / f"{gw}-state" / "rollout" / "site.json").read_text())
        except (OSError, ValueError):
            return {}
        return doc.get("rollouts", {}).get(rollout_id, {})

    def started(self, gw: str, rollout_id: str) -> set[int]:
        return {int(p) for p in self.site_rollout(gw, rollout_id).get("started", {})}

    def in_phase(self, rollout_id: str, phase: int) -> list[str]:
        plan = self.plans[rollout_id]
        return [r for r in self.gateway_of if phase_of(plan, r) == phase]



class PhaseSampler(Sampler):
    """Every 50 ms: a robot on a rollout's target whose phase has not started at its site is a violation."""

    def __init__(self, fleet: RolloutFleet, interval: float = 0.05) -> None:
        super().__init__(interval)
        self.fleet = fleet

    def sample(self) -> None:
        for robot, gw in self.fleet.gateway_of.items():
            version = self.fleet.current(robot)
            for rid, plan in list(self.fleet.plans.items()):
                if version != plan.version:
                    continue
                phase = phase_of(plan, robot)
                if phase is None or phase not in self.fleet.started(gw, rid):
                    self.violations.append(f"{robot} runs {version} of rollout {rid}, but its phase {phase} "
                                           f"had not started at {gw} (started: {sorted(self.fleet.started(gw, rid))})")
