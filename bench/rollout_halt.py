#!/usr/bin/env python3
"""Benchmark the time from a rollout canary's first failure to the halt, in poll intervals.

A measurement, not a test: it always exits 0 (unless it cannot run at all). Two figures
(issue 15, "Measure"), each over --trials rollouts, median and max:

- Site (offline): site A's WAN to the dashboard is cut (otad.demo.faultproxy refusing every
  connection) and stays dark for 1 to 3 POLL_INTERVALs (seeded), as a real outage would
  before a failure comes in; then the canary's rollback reaches A's POST /metrics. Measured
  from the moment that POST is answered until A logs "site gw-a halted" and until the other
  canary robot's GET /manifest no longer offers the target (negative: before the answer).
- Fleet-wide (online): the rollback reaches site A's POST /metrics; measured until the
  dashboard holds the event (A's forwarder), until the dashboard logs its signed `paused`
  revision (its fleet-halt worker), and until site B, which saw no failure, logs that it took
  that revision (B's poll). Each hop is printed, so the one that dominates is plain.

The reference is the poll interval itself: a polling design can do no better than about one
interval per hop that waits for a poll (a site's own halt needs none; the fleet-wide one
needs B's poll of the dashboard), so each figure is printed as a ratio to POLL_INTERVAL.

Real processes on 127.0.0.1: otad-dashboard holding a rollout key (ROLLOUT_KEY) with two
releases published by `otad-release`, two otad-gateways with ROLLOUT_KEYS, plans created
through the dashboard's admin API with an operator token. Robots are HTTP clients posting
their telemetry records (a version metric, then a `rolled_back` event with rollout_id and
phase) to the gateway's POST /metrics with their robot tokens, as the telemetry agent
would: the robot is not what is measured. Log lines are stamped as they arrive on the
daemons' stderr (bench/robot_install.py Daemon). Run it as

    .venv/bin/python bench/rollout_halt.py [--trials 8] [--poll-interval 3] [--check-interval 3]

BACKOFF_MAX is 10 poll intervals, the shipped defaults' ratio (300 s / 30 s). See
docs/benchmarks.md for the figures and how to read them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_serving import wait_until  # noqa: E402 - shared helpers of the benchmarks
from robot_install import Daemon, _bin, write_config  # noqa: E402

from otad.demo.faultproxy import FaultProxy  # noqa: E402

OPERATOR = "bench-operator-token-0123456789"
GATEWAYS = {"gw-a": ["a1", "a2", "a3", "a4"], "gw-b": ["b1", "b2", "b3", "b4"]}
CANARY = ["a1", "a2"]  # both at site A: site B sees no failure
PASSWORD = "bench-password"


def token(name: str) -> str:
    return f"bench-token-{name}-0123456789"


def secret(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def request(method: str, url: str, body: dict | None = None, bearer: str | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if data else {}
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method), timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Robots:
    """Robots as telemetry clients: each record gets the robot's next seq."""

    def __init__(self) -> None:
        self.seq: dict[str, int] = {}

    def post(self, gateway_url: str, robot: str, **fields) -> None:
        self.seq[robot] = self.seq.get(robot, 0) + 1
        ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record = {"robot_id": robot, "boot_id": "boot-1", "seq": self.seq[robot], "ts": ts, **fields}
        status, body = request("POST", f"{gateway_url}/metrics", {"records": [record]}, token(robot))
        if status != 200:
            sys.exit(f"POST /metrics for {robot} answered {status}: {body[:300]!r}")

    def version(self, gateway_url: str, robot: str) -> None:
        self.post(gateway_url, robot, type="metric", cpu=10.0, mem=40.0, version="1.0.0", health="ok")

    def rolled_back(self, gateway_url: str, robot: str, rollout_id: str) -> None:
        self.post(gateway_url, robot, type="event", event="rolled_back", version="2.0.0", detail="selftest failed",
                  rollout_id=rollout_id, phase=0)


def offered(gateway_url: str, robot: str) -> str | None:
    status, body = request("GET", f"{gateway_url}/manifest", bearer=token(robot))
    return json.loads(body).get("version") if status == 200 else None


def line_after(daemon: Daemon, pattern: str, since: float, timeout: float) -> float:
    """Arrival time of the first line matching `pattern` that arrived after `since`."""
    compiled = re.compile(pattern)

    def found():
        with daemon._cond:
            return next((s for s, line in daemon.lines if s > since and compiled.search(line)), None)
    return wait_until(found, timeout, f"{daemon.log.stem} to log {pattern!r}", interval=0.002)


class Fleet:
    def __init__(self, work: Path, poll: int, check: int) -> None:
        self.work, self.poll, self.check = work, poll, check
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "COSIGN_PASSWORD": PASSWORD,
                    "OTAD_ROLLOUT_KEY_PASSWORD": PASSWORD}
        self.daemons: list[Daemon] = []
        self.robots = Robots()

    def start(self) -> None:
        work, release = self.work, _bin("otad-release")
        for role in ("release", "rollout"):
            subprocess.run([release, "keygen", "--output-prefix", str(work / role)], env=self.env, check=True,
                           stdout=subprocess.DEVNULL)
        for version in ("1.0.0", "2.0.0"):
            app = work / f"app-{version}"
            (app / "bin").mkdir(parents=True)
            (app / "VERSION").write_text(version + "\n")
            (app / "bin" / "app").write_text("#!/bin/sh\necho app\n")
            (app / "bin" / "app").chmod(0o755)
            out = work / f"out-{version}"
            subprocess.run([release, "build", "--app-dir", str(app), "--version", version, "--key",
                            str(work / "release.key"), "--out", str(out)], env=self.env, check=True, stdout=subprocess.DEVNULL)
            subprocess.run([release, "publish", "--from", str(out), "--to", str(work / "ota")], env=self.env, check=True,
                           stdout=subprocess.DEVNULL)
        gateway_tokens = secret(work / "gateway-tokens", "".join(f"{g} {token(g)}\n" for g in GATEWAYS))
        operators = secret(work / "operator-tokens", f"bench {OPERATOR}\n")
        self.db = work / "dashboard-state" / "telemetry.db"
        self.dashboard = self._daemon("otad-dashboard", "dashboard", {
            "LISTEN": "127.0.0.1:0", "OTA_DIR": work / "ota", "STATE_DIR": work / "dashboard-state",
            "TOKENS_FILE": gateway_tokens, "OPERATOR_TOKENS_FILE": operators, "ROLLOUT_KEY": work / "rollout.key",
            "ROLLOUT_CHECK_INTERVAL": self.check})
        self.dashboard_url = self.dashboard.url()
        self.wan = FaultProxy(("127.0.0.1", int(self.dashboard_url.rsplit(":", 1)[1])))  # site A's WAN
        self.gw: dict[str, Daemon] = {}
        self.url: dict[str, str] = {}
        for name, robots in GATEWAYS.items():
            upstream = self.wan.url if name == "gw-a" else self.dashboard_url
            self.gw[name] = self._daemon("otad-gateway", name, {
                "DASHBOARD_URL": upstream, "TRUSTED_KEYS": work / "release.pub", "ROLLOUT_KEYS": work / "rollout.pub",
                "LISTEN": "127.0.0.1:0", "STATE_DIR": work / f"{name}-state", "GATEWAY_ID": name,
                "POLL_INTERVAL": self.poll, "BACKOFF_MAX": 10 * self.poll,
                "TOKEN_FILE": secret(work / f"{name}.token", token(name) + "\n"),
                "ROBOT_TOKENS_FILE": secret(work / f"{name}-robots", "".join(f"{r} {token(r)}\n" for r in robots))})
            self.url[name] = self.gw[name].url()
        for name, robots in GATEWAYS.items():
            self.gw[name].wait_for(r"verified app 2\.0\.0", 60)
            for robot in robots:
                self.robots.version(self.url[name], robot)

    def _daemon(self, command: str, name: str, values: dict) -> Daemon:
        config = write_config(self.work / f"{name}.conf", values)
        daemon = Daemon([_bin(command), "--config", str(config)], self.work / f"{name}.log", self.env)
        self.daemons.append(daemon)
        return daemon

    def create(self, rollout_id: str) -> float:
        """A plan through the admin API; returns when every gateway has started its phase 0."""
        since = time.perf_counter()
        criteria = {"max_failures": 0, "min_attempts": 1}
        fields = {"rollout_id": rollout_id, "version": "2.0.0", "from": ["1.0.0"], "on_halt": "pause",
                  "expires": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 86400)),
                  "install_timeout_s": 3600, "offline_policy": "hold",
                  "phases": [{"robots": CANARY, "min_soak_s": 3600, "halt": {"fleet": criteria, "site": criteria}},
                             {"percent": 100}]}
        status, body = request("POST", f"{self.dashboard_url}/api/rollouts", fields, OPERATOR)
        if status != 201:
            sys.exit(f"creating rollout {rollout_id} answered {status}: {body[:300]!r}")
        for gateway in self.gw.values():
            line_after(gateway, rf"rollout {rollout_id} phase 0: started at site", since, 10 * self.poll + 30)
        return since

    def events_held(self, rollout_id: str) -> int:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute("SELECT count(*) FROM rollout_events WHERE rollout_id = ?", (rollout_id,)).fetchone()[0]
        finally:
            conn.close()

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.stop()
        if hasattr(self, "wan"):
            self.wan.close()


def site_trial(fleet: Fleet, n: int, rng: random.Random, deadline: float) -> dict:
    rid = f"site-{n}"
    fleet.create(rid)
    url, gw = fleet.url["gw-a"], fleet.gw["gw-a"]
    if offered(url, "a2") != "2.0.0":
        sys.exit(f"rollout {rid}: canary a2 is not offered 2.0.0 before the failure")
    dark = time.perf_counter()
    fleet.wan.refuse(True)
    line_after(gw, r"sync failed", dark, 10 * fleet.poll + 30)  # the gateway knows it is dark
    dwell = rng.uniform(1, 3) * fleet.poll
    time.sleep(max(0.0, dark + dwell - time.perf_counter()))
    sent = time.perf_counter()
    fleet.robots.rolled_back(url, "a1", rid)
    answered = time.perf_counter()
    wait_until(lambda: offered(url, "a2") != "2.0.0", max(1.0, deadline - time.perf_counter()),
               f"a2 no longer to be offered 2.0.0 in rollout {rid}", interval=0.005)
    robot = time.perf_counter()
    halted = line_after(gw, rf"rollout {rid} phase 0: site gw-a halted", sent, 5)
    fleet.wan.refuse(False)
    os.kill(gw.pid, signal.SIGHUP)  # untimed: the sync worker polls at once instead of finishing its backoff
    return {"dark_s": answered - dark, "post_ms": (answered - sent) * 1e3,
            "halt": halted - answered, "robot": robot - answered}


def fleet_trial(fleet: Fleet, n: int, rng: random.Random, deadline: float) -> dict:
    rid = f"fleet-{n}"
    fleet.create(rid)
    # The failure comes at a random moment of B's poll cycle and of the dashboard's check cycle
    # (just after create(), B has just polled: every trial would wait a whole interval for it).
    time.sleep(rng.uniform(0, max(fleet.poll, fleet.check)))
    sent = time.perf_counter()
    fleet.robots.rolled_back(fleet.url["gw-a"], "a1", rid)
    answered = time.perf_counter()
    stored = wait_until(lambda: fleet.events_held(rid) and time.perf_counter(), max(1.0, deadline - answered),
                        f"the dashboard to hold rollout {rid}'s rollback", interval=0.002)
    issued = line_after(fleet.dashboard, rf"rollout {rid} revision 2 phase 0 halted fleet-wide", sent, 10 * fleet.check + 30)
    taken = line_after(fleet.gw["gw-b"], rf"rollout {rid}: took revision 2 \(paused", sent, 10 * fleet.poll + 30)
    return {"forward": stored - answered, "check": issued - stored, "poll": taken - issued,
            "dashboard": issued - answered, "total": taken - answered}


def summary(label: str, values: list[float], interval: float, unit: str = "POLL_INTERVAL") -> str:
    median, top = statistics.median(values), max(values)
    return (f"  {label:<44} median {median:+7.3f} s  max {top:+7.3f} s   = {median / interval:+5.2f} / "
            f"{top / interval:+5.2f} {unit}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8, help="rollouts per measurement (default 8)")
    parser.add_argument("--poll-interval", type=int, default=3, help="gateways' POLL_INTERVAL, seconds (default 3)")
    parser.add_argument("--check-interval", type=int, default=3, help="dashboard's ROLLOUT_CHECK_INTERVAL (default 3)")
    parser.add_argument("--max-seconds", type=float, default=900, help="bound on the whole run (default 900)")
    parser.add_argument("--seed", type=int, default=1503)
    args = parser.parse_args(argv)
    poll, check = args.poll_interval, args.check_interval
    trials = max(1, min(args.trials, 50))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}")
    print(f"POLL_INTERVAL {poll} s (gateways, +/-10% jitter), BACKOFF_MAX {10 * poll} s, ROLLOUT_CHECK_INTERVAL {check} s "
          f"(dashboard), {trials} trials each, seed {args.seed}")
    started = time.perf_counter()
    deadline = started + args.max_seconds
    rng = random.Random(args.seed)
    sites, fleets = [], []
    with tempfile.TemporaryDirectory(prefix="otad-bench-halt-") as tmp:
        fleet = Fleet(Path(tmp), poll, check)
        try:
            fleet.start()
            for n in range(trials):
                if time.perf_counter() > deadline:
                    break
                sites.append(site_trial(fleet, n, rng, deadline))
                r = sites[-1]
                print(f"site trial {n}: dark {r['dark_s']:.1f} s, POST answered in {r['post_ms']:.1f} ms, halt logged "
                      f"{r['halt']:+.3f} s, robot not offered the target {r['robot']:+.3f} s after the answer")
            # Site A's backlog (the rollbacks it took while dark) reaches the dashboard before the fleet trials.
            for n in range(len(sites)):
                line_after(fleet.dashboard, rf"rollout site-{n} revision 2 phase 0 halted fleet-wide", 0, 20 * poll + 60)
            for n in range(trials):
                if time.perf_counter() > deadline:
                    break
                fleets.append(fleet_trial(fleet, n, rng, deadline))
                r = fleets[-1]
                print(f"fleet trial {n}: dashboard holds the event {r['forward']:+.3f} s, issues the paused revision "
                      f"{r['dashboard']:+.3f} s, site B takes it {r['total']:+.3f} s after A answered the POST")
        finally:
            fleet.close()
    print(f"\nran {time.perf_counter() - started:.0f} s; reference: 1 POLL_INTERVAL ({poll} s) per hop that waits for a poll")
    if sites:
        print(f"site A, WAN down (halts on its own evidence; no hop needs a poll) over {len(sites)} trials:")
        print(summary("POST answered -> 'site gw-a halted' logged", [r["halt"] for r in sites], poll))
        print(summary("POST answered -> a2 no longer offered 2.0.0", [r["robot"] for r in sites], poll))
    if fleets:
        print(f"fleet-wide, online (site B saw no failure) over {len(fleets)} trials:")
        print(summary("hop 1: A's forwarder -> dashboard holds it", [r["forward"] for r in fleets], poll))
        print(summary("hop 2: fleet-halt worker -> revision signed", [r["check"] for r in fleets], check,
                      "ROLLOUT_CHECK_INTERVAL"))
        print(summary("hop 3: site B's poll -> B took the revision", [r["poll"] for r in fleets], poll))
        print(summary("total: POST answered at A -> B took it", [r["total"] for r in fleets], poll))
        hops = {"forward": "A's forwarder", "check": "the dashboard's check interval", "poll": "B's poll"}
        slowest = max(hops, key=lambda h: statistics.median(r[h] for r in fleets))
        print(f"  dominant hop: {hops[slowest]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
