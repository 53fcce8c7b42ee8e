"""What the demo shows, read from the real sources, never from its own bookkeeping.

- a robot: its state.json and CURRENT symlink (what `otadctl status --json`
  reads, through the same classes), its download progress as the size of the
  `.part` file it is writing against the release's signed size, and the
  `STATUS=` line it sends to its notify socket;
- the gateway: its own `STATUS=` line (`serving app 1.1.0; telemetry: 12 pending, WAN down since 10:42`);
- the dashboard: `GET /status.json`, the document the /status page is drawn from.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from otad.demo.fleet import RobotPaths
from otad.demo.procs import StatusSocket
from otad.errors import OtadError
from otad.robot.layout import AppDir
from otad.robot.state import StateStore
from otad.transfer.client import HttpClient, TransferLimits

MAX_STATUS_JSON = 8 * 1024 * 1024


@dataclass(frozen=True)
class RobotView:
    robot_id: str
    current: str | None
    phase: str  # idle, downloading, verifying, or the installer's phase (unpacking, selftest, rolling_back, ...)
    target: str | None
    percent: int | None
    blacklist: tuple[str, ...] = ()
    last_failure: dict | None = field(default=None, compare=False)

    def line(self) -> str:
        text = f"{self.robot_id:8} runs {self.current or 'nothing':7}"
        if self.phase != "idle":
            text += f"  {self.phase.replace('_', ' ')} {self.target or '?'}"
            if self.percent is not None and self.phase == "downloading":
                text += f" {self.percent:3d}%"
        else:
            text += "  idle"
        if self.blacklist:
            text += f"   blacklist: {', '.join(self.blacklist)}"
        return text


def robot_view(paths: RobotPaths, sizes: dict[str, tuple[str, int]]) -> RobotView:
    """`sizes`: artifact file name -> (version, signed size), for every release published."""
    try:
        state = StateStore(paths.state_dir).load()
    except OtadError:  # a state file being replaced right now; the next sample reads it
        return RobotView(paths.robot_id, None, "unknown", None, None)
    current = AppDir(paths.app_dir).target("CURRENT")
    phase, target, percent = state.phase, state.target, None
    for part in sorted((paths.state_dir / "downloads").glob("*.part")):
        # A release the demo did not publish itself (you, by hand): its name, no percentage.
        version, size = sizes.get(part.name.removesuffix(".part"), (part.name.removesuffix(".part"), 0))
        try:
            have = part.stat().st_size
        except FileNotFoundError:
            continue
        percent = min(100, 100 * have // size) if size else None
        if phase == "idle":
            phase, target = ("downloading" if not size or have < size else "verifying"), version
    return RobotView(paths.robot_id, current, phase, target, percent, tuple(state.blacklist), state.last_failure)


@dataclass(frozen=True)
class GatewayView:
    serving: str | None
    backlog: int | None  # telemetry records waiting in the gateway's SQLite buffer
    wan_down: bool
    status: str = field(compare=False, default="")

    def line(self) -> str:
        wan = "WAN DOWN" if self.wan_down else "WAN up"
        backlog = "?" if self.backlog is None else f"{self.backlog:,}"
        return f"gateway serving {self.serving or '-'}, {wan}, telemetry backlog {backlog}"


_SERVING = re.compile(r"serving \S+ (\S+?)(?:;|$)")
_PENDING = re.compile(r"telemetry: ([\d,]+) pending")


def gateway_view(status: StatusSocket) -> GatewayView:
    text = status.poll()
    serving = _SERVING.search(text)
    pending = _PENDING.search(text)
    return GatewayView(serving[1] if serving else None, int(pending[1].replace(",", "")) if pending else None,
                       "WAN down since" in text, text)


class DashboardReader:
    def __init__(self, url: str) -> None:
        self.client = HttpClient(url, TransferLimits(2, 5))

    def status(self) -> dict | None:
        try:
            return json.loads(self.client.get_small("/status.json", MAX_STATUS_JSON).body)
        except (OtadError, ValueError):
            return None

    def close(self) -> None:
        self.client.close()


def robots_at(doc: dict | None) -> dict[str, dict]:
    return {r["robot_id"]: r for r in (doc or {}).get("robots", [])}


def events_at(doc: dict | None) -> set[tuple[str, str, str]]:
    """(robot_id, event, version) of the update events the dashboard lists."""
    return {(e.get("robot_id", ""), e.get("event", ""), e.get("version", "")) for e in (doc or {}).get("events", [])
            if e.get("type") == "event"}
