"""The gateway's persisted rollout state (issue 15), under STATE_DIR/rollout/. See docs/formats.md.

Three files, each replaced atomically (fsutil: temp file, fsync, rename, fsync dir):
- `seen.json`: the highest plan revision seen per rollout (otad.rollout.signed
  render_seen), written before a new revision is kept or acted on, so a replayed
  older revision is refused after a restart too;
- `plans.json`: the verified Wire 1 items (plan text + bundle) this site carries out,
  so it keeps working offline after a restart; re-verified when read;
- `site.json`: what this site did per rollout (phase start times, the halt, robots'
  events, what the dashboard was last told) and each robot's last reported version
  with the one before it (what an on_halt=rollback returns it to).
Everything here only grows within a rollout, so decisions recomputed after a
kill -9 are the ones made before it (otad/rollout/progress.py).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from otad.errors import OtadError
from otad.fsutil import atomic_write_bytes, make_dirs
from otad.rollout.plan import PlanError
from otad.rollout.progress import EVENT_KINDS, Event
from otad.rollout.signed import SeenRevision, parse_seen, render_seen

log = logging.getLogger("otad.gateway")
MAX_EVENTS = 50_000  # per rollout: a few per robot; beyond it new events are not counted (logged)
MAX_ROBOTS = 100_000


@dataclass
class RolloutRecord:
    """One rollout at this site."""

    started: dict[int, float] = field(default_factory=dict)  # phase -> when it started here
    reasons: dict[int, str] = field(default_factory=dict)  # phase -> why it started (or halted)
    halted: dict | None = None  # {"at", "reason", "phase", "state"} while the site's criteria are breached
    events: list[Event] = field(default_factory=list)
    reported: str | None = None  # sha256 of the last site report the dashboard took (Wire 4)
    said: str = ""  # the last waiting reason logged, so a stable reason is logged once

    def has(self, robot_id: str, phase: int, kind: str) -> bool:
        return any(e.robot_id == robot_id and e.phase == phase and e.kind == kind for e in self.events)


@dataclass
class SiteState:
    rollouts: dict[str, RolloutRecord] = field(default_factory=dict)
    robots: dict[str, dict] = field(default_factory=dict)  # robot -> {"version": v, "came_from": v | None}


class RolloutFiles:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "rollout"
        self.seen_path = self.root / "seen.json"
        self.plans_path = self.root / "plans.json"
        self.site_path = self.root / "site.json"

    # -- seen revisions (anti-replay) ------------------------------------------------
    def load_seen(self) -> dict[str, SeenRevision]:
        """A missing file is a gateway's first rollout; an unreadable one is an error (never
        silently empty: that would let every old revision in again)."""
        try:
            return parse_seen(self.seen_path.read_bytes())
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise OtadError(f"cannot read {self.seen_path}: {exc}") from None
        except PlanError as exc:
            raise OtadError(f"{self.seen_path}: {exc}; move it away only if no old plan revision can be replayed") from None

    def save_seen(self, seen: dict[str, SeenRevision]) -> None:
        self._write(self.seen_path, render_seen(seen))

    # -- verified plans (Wire 1 items) ------------------------------------------------
    def load_plans(self) -> list[dict]:
        try:
            doc = json.loads(self.plans_path.read_bytes())
            items = doc["plans"]
            if not isinstance(items, list):
                raise ValueError
            return [i for i in items if isinstance(i, dict)]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("rollout: %s is unreadable (%s); waiting for the dashboard's plans", self.plans_path, exc)
            return []

    def save_plans(self, items: list[dict]) -> None:
        self._write(self.plans_path, (json.dumps({"schema": 1, "plans": items}, sort_keys=True) + "\n").encode())

    # -- what this site did -------------------------------------------------------------
    def load_site(self) -> SiteState:
        try:
            doc = json.loads(self.site_path.read_bytes())
        except FileNotFoundError:
            return SiteState()
        except (OSError, ValueError) as exc:
            raise OtadError(f"cannot read {self.site_path}: {exc}") from None
        try:
            return _site_from_doc(doc)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise OtadError(f"{self.site_path} is not well formed ({type(exc).__name__}: {exc})") from None

    def save_site(self, state: SiteState) -> None:
        self._write(self.site_path, (json.dumps(_site_doc(state), sort_keys=True) + "\n").encode())

    def _write(self, path: Path, data: bytes) -> None:
        try:
            make_dirs(self.root)
            atomic_write_bytes(path, data)
        except OSError as exc:
            raise OtadError(f"cannot write {path}: {exc}") from None


def _site_doc(state: SiteState) -> dict:
    rollouts = {}
    for rid, rec in state.rollouts.items():
        rollouts[rid] = {
            "started": {str(p): t for p, t in rec.started.items()},
            "reasons": {str(p): r for p, r in rec.reasons.items()},
            "halted": rec.halted,
            "events": [[e.robot_id, e.phase, e.kind, e.at] for e in rec.events],
            "reported": rec.reported,
        }
    return {"schema": 1, "rollouts": rollouts, "robots": state.robots}


def _site_from_doc(doc: dict) -> SiteState:
    if doc.get("schema") != 1:
        raise ValueError("unknown schema")
    state = SiteState()
    for rid, rec in doc["rollouts"].items():
        events = []
        for robot, phase, kind, at in rec["events"]:
            if not (isinstance(robot, str) and isinstance(phase, int) and kind in EVENT_KINDS):
                raise ValueError(f"bad event in rollout {rid}")
            events.append(Event(robot, "", phase, kind, float(at)))
        halted = rec["halted"]
        if halted is not None and not isinstance(halted, dict):
            raise ValueError(f"bad halt in rollout {rid}")
        state.rollouts[rid] = RolloutRecord(
            started={int(p): float(t) for p, t in rec["started"].items()},
            reasons={int(p): str(r) for p, r in rec.get("reasons", {}).items()},
            halted=halted, events=events, reported=rec.get("reported"))
    for robot, info in doc["robots"].items():
        if not isinstance(info, dict):
            raise ValueError(f"bad robot {robot}")
        state.robots[robot] = {"version": info.get("version"), "came_from": info.get("came_from")}
    return state
