"""Site orchestration at the gateway (issue 16): a real otad-gateway, real HTTP, real files.

Robots are HTTP clients with their telemetry tokens asking POST /lease (Wire 5,
docs/formats.md), as otad-robot's lease client does; the robot's own side is
another test file's. The gateway's clock is put at a chosen instant with
OTAD_TEST_CLOCK_SKEW (otad.trust.clock), so a window can be closed or open, and
a lease can expire, without waiting for it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests

from fleet import robot_token, write_tokens
from harness import wait_until

ROBOTS = ["r1", "r2", "r3", "r4", "r5"]


class LeaseSite:
    """A gateway with ROBOT_TOKENS_FILE for ROBOTS, and robots asking it for leases."""

    def __init__(self, site, root: Path, robots: list[str] = ROBOTS) -> None:
        self.site, self.root, self.robots = site, root, robots
        self.tokens = write_tokens(root, robots)
        self.gw = None

    def start(self, env: dict | None = None, **settings):
        self.gw = self.site.gateway(ROBOT_TOKENS_FILE=self.tokens["robots"], env=env, **settings).start()
        return self.gw

    def restart(self, env: dict | None = None):
        if env is not None:
            self.gw.env.update(env)
        self.gw = self.gw.start()
        return self.gw

    @property
    def leases_file(self) -> Path:
        return self.root / "gw-state" / "orchestration" / "leases.json"

    def post(self, robot: str | None, body: bytes, headers: dict | None = None) -> requests.Response:
        auth = {"Authorization": f"Bearer {robot_token(robot)}"} if robot else {}
        return requests.post(f"{self.gw.url}/lease", data=body, headers={**auth, **(headers or {})}, timeout=10)

    def lease(self, robot: str, op: str, **fields) -> dict:
        reply = self.post(robot, json.dumps({"op": op, **fields}).encode())
        assert reply.status_code == 200, reply.text
        answer = reply.json()
        assert set(answer) == {"state", "reason", "lease", "ttl_s", "ahead", "retry_s"}, answer
        return answer

    def request(self, robot: str, version: str = "2.0.0") -> dict:
        return self.lease(robot, "request", version=version)

    def renew(self, robot: str, lease: int) -> dict:
        return self.lease(robot, "renew", lease=lease)

    def release(self, robot: str, lease: int, outcome: str = "committed") -> dict:
        return self.lease(robot, "release", lease=lease, outcome=outcome)


@pytest.fixture
def leases(site, tmp_path):
    return LeaseSite(site, tmp_path)


def test_the_site_budget_holds_across_robots_and_waiters_are_served_in_arrival_order(leases):
    leases.start(SITE_MAX_CONCURRENT=2)
    first, second = leases.request("r1"), leases.request("r2")
    assert first["state"] == second["state"] == "granted" and first["lease"] != second["lease"]
    assert first["ttl_s"] == 300 and first["retry_s"] == 5
    waits = [leases.request(robot) for robot in ("r3", "r4", "r5")]
    assert [w["state"] for w in waits] == ["waiting"] * 3
    assert [w["ahead"] for w in waits] == [0, 1, 2]
    assert "site budget full: 2 of 2 leases in use (SITE_MAX_CONCURRENT 2)" in waits[2]["reason"]
    # Asking again keeps the place, and never a second lease for a holder.
    assert leases.request("r4")["ahead"] == 1
    assert leases.request("r1")["lease"] == first["lease"]
    # A release frees one slot, for the first in line only.
    assert leases.release("r2", second["lease"])["state"] == "released"
    assert leases.request("r4")["state"] == "waiting" and leases.request("r5")["ahead"] == 1
    granted = leases.request("r3")
    assert granted["state"] == "granted"
    log = leases.gw.wait_for_log(rf"lease: granted lease {granted['lease']} to r3 for 2\.0\.0")
    assert log
    text = leases.gw.new_log()
    assert "lease: r2 released lease 2 (2.0.0): committed after" in text
    assert text.count("lease: r4 waits for 2.0.0") == 1  # a stable reason is logged once, not every ask
