"""The demo's story, step by step, each with an expectation and a deadline.

v1.0.0 reaches every robot; v1.1.0 too; v1.2.0's self-test fails, so every
robot rolls back to v1.1.0 and blacklists v1.2.0; the WAN goes down, the
gateway buffers telemetry, and flushes it when the WAN is back. Progress
comes from the real sources (otad.demo.watch); a step that does not happen
before its deadline fails the story.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from otad.demo.fleet import GATEWAY_ID, Fleet
from otad.demo.releases import StepFailed, build_and_publish
from otad.demo.watch import DashboardReader, GatewayView, RobotView, events_at, gateway_view, robot_view, robots_at

T = TypeVar("T")
STEP_TIMEOUT = 60.0  # generous: the whole story takes well under a minute on a laptop
OUTAGE_S = 10.0
SAMPLE_S = 0.2
GOOD, BAD = ("1.0.0", "1.1.0"), "1.2.0"


class Story:
    def __init__(self, fleet: Fleet, work: Path, key: Path, env: dict[str, str]) -> None:
        self.fleet, self.work, self.key, self.env = fleet, work, key, env
        self.dashboard = DashboardReader(fleet.dashboard.url)
        self.started = time.monotonic()
        self.sizes: dict[str, tuple[str, int]] = {}
        self.robots: dict[str, RobotView] = {}
        self.gateway: GatewayView | None = None
        self.results: list[tuple[str, bool, str]] = []
        self.facts: list[str] = []

    # -- output and sampling ---------------------------------------------------------
    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:5.1f}s] {text}", flush=True)

    def sample(self) -> None:
        """Read every robot and the gateway; print what changed."""
        for robot_id, paths in self.fleet.robots.items():
            view = robot_view(paths, self.sizes)
            previous = self.robots.get(robot_id)
            if previous is None or _shown(previous) != _shown(view):
                self.say("  " + view.line())
            self.robots[robot_id] = view
        view = gateway_view(self.fleet.gateway.status)
        if view != self.gateway:
            self.say("  " + view.line())
        self.gateway = view

    def check(self, what: str) -> None:
        self.sample()
        dead = self.fleet.dead()
        if dead:
            raise StepFailed(f"while waiting for {what}: daemon exited: {', '.join(dead)}")

    def wait(self, what: str, predicate: Callable[[], T], timeout: float = STEP_TIMEOUT) -> T:
        deadline = time.monotonic() + timeout
        while True:
            self.check(what)
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise StepFailed(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(SAMPLE_S)

    def step(self, title: str, body: Callable[[], str]) -> bool:
        print(f"\n== {title}", flush=True)
        began = time.monotonic()
        try:
            outcome = body()
        except StepFailed as exc:
            self.say(f"FAILED: {exc}")
            self.results.append((title, False, str(exc)))
            return False
        self.results.append((title, True, f"{outcome} ({time.monotonic() - began:.1f}s)"))
        return True

    # -- the steps ---------------------------------------------------------------------
    def run(self) -> bool:
        steps = [
            (f"release {GOOD[0]}: build, sign, publish; every robot installs it", lambda: self.release(GOOD[0])),
            (f"release {GOOD[1]}: the same way, an upgrade", lambda: self.release(GOOD[1])),
            (f"release {BAD}: its self-test fails on purpose", self.bad_release),
            ("WAN down: the gateway cannot reach the dashboard", self.wan_down),
            ("WAN up: the gateway flushes its backlog", self.wan_up),
        ]
        for title, body in steps:
            if not self.step(title, body):
                return False
        return True

    def publish(self, version: str, selftest_passes: bool) -> None:
        manifest = build_and_publish(self.work, version, selftest_passes, self.key, self.fleet.ota, self.env)
        self.sizes[manifest.artifact] = (version, manifest.size)
        self.say(f"published {manifest.artifact} ({manifest.size:,} bytes, sha256 {manifest.sha256[:12]}...);"
                 " the gateway polls the dashboard, the robots poll the gateway")

    def release(self, version: str) -> str:
        self.publish(version, selftest_passes=True)
        self.wait(f"every robot on {version}",
                  lambda: all(v.current == version and v.phase == "idle" for v in self.robots.values()))
        self.say(f"every robot runs {version}; waiting for their telemetry at the dashboard")
        self.wait(f"the dashboard to show {version} for every robot", lambda: self._dashboard_versions(version))
        self.say(f"dashboard: {len(self.fleet.robots)} robots on {version}")
        return f"{len(self.fleet.robots)} robots on {version}"

    def bad_release(self) -> str:
        good = GOOD[-1]
        self.publish(BAD, selftest_passes=False)
        self.wait(f"every robot to roll back to {good} and blacklist {BAD}", lambda: all(
            v.current == good and v.phase == "idle" and BAD in v.blacklist for v in self.robots.values()))
        for robot_id, view in self.robots.items():
            reason = (view.last_failure or {}).get("reason", "?").splitlines()[0]
            self.say(f"{robot_id}: rolled back {BAD} -> {view.current}: {reason}")
            self.say(f"{robot_id}: blacklisted {BAD}; it stays on {view.current}")
        wanted = {(r, e, BAD) for r in self.fleet.robots for e in ("rolled_back", "blacklisted")}
        self.wait("the rollbacks and blacklistings at the dashboard", lambda: wanted <= events_at(self.dashboard.status()))
        self.say(f"dashboard: {len(wanted)} events (rolled_back, blacklisted) for {BAD}")
        return f"{len(self.fleet.robots)} robots rolled back to {good}, {BAD} blacklisted"

    def wan_down(self) -> str:
        self.records_before = self._dashboard_records()
        self.fleet.wan.refuse(True)
        self.say(f"the WAN proxy now refuses every connection from {GATEWAY_ID} to the dashboard")
        self.wait("the gateway to notice the WAN is down", lambda: self.gateway and self.gateway.wan_down, 20)
        first = self.gateway.backlog or 0
        down_at = time.monotonic()
        self.peak = first
        while time.monotonic() - down_at < OUTAGE_S:
            self.check("telemetry to pile up at the gateway")
            self.peak = max(self.peak, self.gateway.backlog or 0)
            time.sleep(SAMPLE_S)
        if not self.gateway.wan_down or self.peak <= first or self.peak < 5:
            raise StepFailed(f"the backlog did not grow while the WAN was down ({first} -> {self.peak})")
        self.say(f"buffering: the gateway holds {self.peak} telemetry records for the dashboard")
        return f"backlog grew from {first} to {self.peak} records in {OUTAGE_S:.0f}s"

    def wan_up(self) -> str:
        self.fleet.wan.refuse(False)
        began = time.monotonic()
        self.say("the WAN is back")
        self.wait("the gateway to flush its backlog",
                  lambda: self.gateway and not self.gateway.wan_down and self.gateway.backlog == 0, 30)
        flushed_s = time.monotonic() - began
        self.wait("the dashboard to hold every buffered record", lambda: self._flushed(self.records_before + self.peak), 30)
        held = self._dashboard_records() - self.records_before
        self.say(f"flushed: {self.peak} buffered records reached the dashboard in {flushed_s:.1f}s"
                 f" ({held} new records there since the outage began)")
        return f"flushed {self.peak} records in {flushed_s:.1f}s"

    # -- the dashboard's view ------------------------------------------------------------
    def _dashboard_versions(self, version: str) -> bool:
        robots = robots_at(self.dashboard.status())
        return all(robots.get(r, {}).get("version") == version for r in self.fleet.robots)

    def _dashboard_records(self) -> int:
        return sum(r.get("records", 0) for r in robots_at(self.dashboard.status()).values())

    def _flushed(self, at_least: int) -> bool:
        doc = self.dashboard.status() or {}
        gateway = next((g for g in doc.get("gateways", []) if g["gateway_id"] == GATEWAY_ID), None)
        return gateway is not None and gateway["backlog"] == 0 and self._dashboard_records() >= at_least

    # -- the end -----------------------------------------------------------------------
    def summary(self, ok: bool) -> None:
        print("\n== summary", flush=True)
        for title, passed, detail in self.results:
            print(f"  {'ok    ' if passed else 'FAILED'} {title}: {detail}")
        for robot_id, view in self.robots.items():
            print(f"  {robot_id}: running {view.current or '-'}, blacklist: {', '.join(view.blacklist) or '-'}")
        doc = self.dashboard.status() or {}
        for gateway in doc.get("gateways", []):
            print(f"  gateway {gateway['gateway_id']}: backlog {gateway['backlog']}, WAN {gateway.get('wan', '?')}")
        print(f"  dashboard versions: {doc.get('versions', {})}")
        print(f"  took {time.monotonic() - self.started:.0f}s")
        print("demo: OK" if ok else "demo: FAILED", flush=True)


def _shown(view: RobotView) -> tuple:
    """What a progress line shows: a change of download percent counts in steps of 20."""
    percent = view.percent // 20 if view.percent is not None and view.phase == "downloading" else None
    return (view.current, view.phase, view.target, percent, view.blacklist)
