"""The robot's side of site orchestration (issue 16): may this robot stop its app now?

The worker downloads and verifies a release with no lease and keeps it staged;
before it installs, `UpdateGate.admit` decides, in this order:
1. INHIBIT_FILE: while it exists (the app's own "on a mission" flag, as RAUC's
   inhibit files and balena's lock files), nothing starts. Never forced.
2. READY_CMD, run with READY_TIMEOUT_S through runner.py and read by the pure
   otad/orchestration/readiness.py: 0 ready, 75 not now (`retry-after=SECONDS`),
   anything else an error; not run again before its retry time. A plan's
   `force_after_s` makes a robot deferred that long proceed anyway.
3. An install lease from the gateway (leaseclient.py, Wire 5), asked again every
   `retry_s` the gateway names, the robot keeping its place in the queue.
When granted, the inhibit file and READY_CMD are checked once more right before
the app is stopped; a robot no longer ready gives the lease back (`withdrawn`).

The state `otadctl status` shows is STATE_DIR/orchestration.json (atomic writes):
the one-line `update` status, the start of the current deferral (`deferred_since`,
so READY_MAX_DEFER_S counts across restarts) and the lease held while installing,
persisted before unpacking, so a robot killed mid-install gives it back after its
restart once recovery is done (`settle`). Every change of the status is one
journal line naming version, robot and reason; an unchanged one is not repeated.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from otad.errors import OtadError, TransportError
from otad.fsutil import atomic_write_bytes
from otad.orchestration.readiness import ReadySettings, interpret
from otad.robot import runner
from otad.robot.leaseclient import LeaseClient, LeaseUnsupported, Renewer, one_line
from otad.robot.settings import RobotSettings
from otad.semver import same_version

log = logging.getLogger("otad.robot")
STATE_FILE = "orchestration.json"
OUTCOMES = ("committed", "rolled_back", "withdrawn")  # Wire 5's release outcomes
# A wait for the maintenance window is shown in the gateway's words ("outside window until 22:00");
# any other wait as the robot's place in the queue.
WINDOW_REASONS = ("outside window", "window closes")
SCHEMA = 1


@dataclass(frozen=True)
class Held:
    lease: int
    version: str
    ttl_s: int
    outcome: str = ""  # set once the install ended, while the gateway has not confirmed the release


@dataclass(frozen=True)
class Verdict:
    go: bool
    delay: float = 0.0  # not go: look again in this many seconds
    held: Held | None = None  # go: the lease to install under (None: no lease needed)


def empty_state() -> dict:
    return {"schema": SCHEMA, "update": "", "version": None, "deferred_since": None, "lease": None}


def load_state(state_dir: Path) -> dict:
    """STATE_DIR/orchestration.json; the empty state if there is none (OtadError if it is unreadable)."""
    path = state_dir / STATE_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return empty_state()
    except OSError as exc:
        raise OtadError(f"{path}: unreadable ({exc.strerror})") from None
    try:
        return parse_state(data)
    except ValueError as exc:
        raise OtadError(f"{path}: {exc}") from None


def parse_state(data: bytes) -> dict:
    """The fields of an orchestration.json, each of its type or the empty value; ValueError if it is none."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ValueError("not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ValueError(f"not the robot's update state (schema {SCHEMA})")
    state = empty_state()
    if isinstance(doc.get("update"), str):
        state["update"] = one_line(doc["update"], 400)
    if isinstance(doc.get("version"), str):
        state["version"] = one_line(doc["version"], 64)
    since = doc.get("deferred_since")
    if type(since) in (int, float) and 0 <= since < 2**40:
        state["deferred_since"] = float(since)
    held = _held(doc.get("lease"))
    if held is not None:
        state["lease"] = {"lease": held.lease, "version": held.version, "ttl_s": held.ttl_s, "outcome": held.outcome}
    return state


class UpdateGate:
    def __init__(self, settings: RobotSettings, leases: LeaseClient, beat=lambda: None) -> None:
        self.settings, self.leases, self.beat = settings, leases, beat
        self.path = settings.state_dir / STATE_FILE
        try:
            doc = load_state(settings.state_dir)
        except OtadError as exc:
            # Only the status and a deferral's start are lost: a held lease expires at the gateway.
            log.warning("%s; starting from an empty update state", exc)
            doc = empty_state()
        self.update: str = doc["update"]
        self.deferred_since: float | None = doc["deferred_since"]
        self.held = _held(doc["lease"])
        self._key = ""  # the status without its changing counts: a journal line only when this changes
        self._retry_at = 0.0  # time.monotonic() before which READY_CMD is not run again
        self._was_ready = False  # its last answer
        self._queued = False  # the gateway has this robot in its queue
        self._reported = ""  # the last deferral sent to the gateway
        self._told_unsupported = False
        self.renewer: Renewer | None = None
        if self.update and self.held is None:
            # What it waited for before the restart is looked at afresh at the first poll.
            self.update = ""
            self._save(doc["version"])

    # -- the decision ---------------------------------------------------------------------
    def admit(self, version: str, force_after_s: int | None) -> Verdict:
        """May the verified, staged `version` be installed now?"""
        delay = self._not_ready(version, force_after_s, final=False)
        if delay is not None:
            return Verdict(False, delay)
        if not self.settings.uses_leases:
            return self._go(version)
        try:
            answer = self.leases.request(version)
        except LeaseUnsupported as exc:
            return self._unsupported(version, exc.status)
        except (TransportError, OtadError) as exc:
            self._set(version, f"lease request failed: {one_line(exc)}")
            return Verdict(False, float(self.settings.poll_interval))
        self._queued = answer.state == "waiting"
        if answer.state != "granted":
            if answer.state == "waiting" and not answer.reason.startswith(WINDOW_REASONS):
                line = f"waiting for lease ({answer.ahead or 0} ahead)"
            else:
                line = answer.reason if answer.state == "waiting" else f"lease {answer.state}: {answer.reason}"
            self._set(version, line, detail=answer.reason)
            return Verdict(False, answer.retry_s)
        held = Held(answer.lease, version, answer.ttl_s)
        self.held = held
        self._save(version)  # before anything is unpacked: a kill -9 from here on releases it after the restart
        delay = self._not_ready(version, force_after_s, final=True)
        if delay is not None:
            self.finish("withdrawn", clear=False)  # the deferral just recorded stays the status
            return Verdict(False, delay)
        self._finish_deferral()
        self._set(version, f"installing {version} (lease {held.lease})")
        return Verdict(True, held=held)

    def _unsupported(self, version: str, status: int) -> Verdict:
        if self.settings.leases == "yes":
            self._set(version, f"waiting: the gateway has no POST /lease (HTTP {status}) and LEASES=yes")
            return Verdict(False, float(self.settings.poll_interval))
        if not self._told_unsupported:
            self._told_unsupported = True
            log.warning("the gateway answers %d to POST /lease (a gateway older than install leases): "
                        "installing app %s on robot %s without a lease (LEASES=auto)", status, version,
                        self.settings.robot_id)
        return self._go(version)

    def _go(self, version: str) -> Verdict:
        """Install without a lease: no deferral, nothing waited for any more."""
        self._finish_deferral()
        self._set(version, "")
        return Verdict(True)

    def _not_ready(self, version: str, force_after_s: int | None, final: bool) -> float | None:
        """None when the robot is ready (or forced); else seconds until it looks again."""
        settings, now = self.settings, time.time()
        inhibit = settings.inhibit_file
        if inhibit is not None and inhibit.exists():
            since = self.deferred_since if self.deferred_since is not None and self.deferred_since <= now else now
            waited = now - since
            late = f"; deferred_too_long ({waited:.0f}s, READY_MAX_DEFER_S={settings.ready_max_defer_s})" \
                if waited >= settings.ready_max_defer_s else ""
            self._defer(version, f"inhibited by {inhibit}{late}", since, bool(late))
            return float(min(settings.ready_retry_s, settings.poll_interval))  # a stat is cheap: look every poll
        if not settings.ready_cmd:
            return None
        if not final and time.monotonic() < self._retry_at:
            # Until its next run, the last answer stands: ready stays ready while it waits for a
            # lease (the final check runs it again anyway), not now stays not now.
            return None if self._was_ready else self._retry_at - time.monotonic()
        outcome = runner.run(settings.ready_cmd, settings.ready_timeout_s, env={"OTAD_VERSION": version}, alive=self.beat)
        ready = interpret(outcome.returncode, outcome.head, time.time(), self.deferred_since,
                          ReadySettings(settings.ready_retry_s, settings.ready_max_defer_s, force_after_s))
        self._was_ready = ready.proceed
        if ready.proceed:
            self._retry_at = time.monotonic() + settings.ready_retry_s
            if ready.state == "forced":
                log.warning("app %s on robot %s: %s", version, settings.robot_id, ready.reason)
            return None
        delay = max(0.0, (ready.retry_at or now) - time.time())
        self._retry_at = time.monotonic() + delay
        self._defer(version, ready.reason, ready.deferred_since, ready.deferred_too_long)
        return delay

    def _defer(self, version: str, reason: str, since: float | None, too_long: bool) -> None:
        self.deferred_since = since
        self._set(version, reason)
        if not self.settings.uses_leases or self._key == self._reported:
            return
        try:
            self.leases.defer(reason, too_long)  # out of the queue: the site view shows why
            self._queued = False
            self._reported = self._key
        except LeaseUnsupported:
            self._reported = self._key
        except (TransportError, OtadError) as exc:
            log.warning("could not report the deferral of robot %s to the gateway: %s", self.settings.robot_id, one_line(exc))

    def _finish_deferral(self) -> None:
        self._reported = ""
        if self.deferred_since is not None:
            self.deferred_since = None
            self._save(None)

    # -- holding and giving back ----------------------------------------------------------
    def renew_while_installing(self) -> None:
        """Start renewing the held lease (every ttl_s/3) until `finish`."""
        if self.held is not None:
            what = f"app {self.held.version}, robot {self.settings.robot_id}"
            self.renewer = Renewer(self.leases, self.held.lease, self.held.ttl_s, what).start()

    def finish(self, outcome: str, clear: bool = True) -> None:
        """The install ended (committed, rolled_back) or never began (withdrawn): give the lease back.
        If the gateway cannot be reached, the lease stays persisted and `settle` retries."""
        self._retry_at, self._was_ready = 0.0, False  # the next release asks READY_CMD afresh
        if self.renewer is not None:
            self.renewer.stop(self.settings.connect_timeout + self.settings.read_timeout + 5.0)
            self.renewer = None
        held = self.held
        if held is None:
            self._set(None, "")
            return
        try:
            answer = self.leases.release(held.lease, outcome)
        except LeaseUnsupported:
            answer = None
        except (TransportError, OtadError) as exc:
            log.warning("could not release lease %d (app %s, robot %s, %s): %s; trying again at the next poll",
                        held.lease, held.version, self.settings.robot_id, outcome, one_line(exc))
            self.held = Held(held.lease, held.version, held.ttl_s, outcome)
            if clear:  # a withdrawn lease keeps the deferral that withdrew it as the status
                self._set(held.version, f"releasing lease {held.lease} ({outcome})")
            self._save(held.version)
            return
        log.info("released lease %d: app %s, robot %s, %s%s", held.lease, held.version, self.settings.robot_id, outcome,
                 f" ({answer.reason})" if answer is not None else "")
        self.held = None
        if clear:
            self._set(None, "")
        else:
            self._save(held.version)

    def settle(self, current: str | None) -> None:
        """A lease still held from before (a kill -9 mid-install, or a failed release): give it back.
        Called once recovery is done, at every poll until the gateway confirms."""
        if self.held is None or self.renewer is not None:
            return
        outcome = self.held.outcome or ("committed" if same_version(current, self.held.version) else "rolled_back")
        self.finish(outcome, clear=self.held.outcome != "withdrawn")

    def drop(self, why: str) -> None:
        """The staged release is no longer to be installed (the target changed, the plan paused)."""
        if self._queued and self.settings.uses_leases:
            try:
                self.leases.defer(f"not updating: {why}", False)
            except (LeaseUnsupported, TransportError, OtadError):
                pass  # the gateway drops a waiter it no longer hears from
        self._queued, self._retry_at, self._was_ready = False, 0.0, False
        self._finish_deferral()
        if self.held is None:
            self._set(None, "")

    # -- the status -----------------------------------------------------------------------
    def _set(self, version: str | None, line: str, detail: str = "") -> None:
        key = re.sub(r"\(\d+s, READY_MAX", "(READY_MAX", line)  # the growing count alone is no new decision
        if key != self._key and line:
            why = f" ({detail})" if detail and detail != line else ""
            log.info("update of app %s on robot %s: %s%s", version, self.settings.robot_id, line, why)
        changed = line != self.update
        self._key, self.update = key, line
        if changed:
            self._save(version)

    def _save(self, version: str | None) -> None:
        held = self.held
        doc = {"schema": SCHEMA, "update": self.update, "version": version, "deferred_since": self.deferred_since,
               "lease": None if held is None else {"lease": held.lease, "version": held.version, "ttl_s": held.ttl_s,
                                                   "outcome": held.outcome}}
        atomic_write_bytes(self.path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())


def _held(doc: object) -> Held | None:
    if not isinstance(doc, dict):
        return None
    lease, version, ttl, outcome = doc.get("lease"), doc.get("version"), doc.get("ttl_s"), doc.get("outcome", "")
    if type(lease) is int and 0 < lease <= 2**53 and isinstance(version, str) and 0 < len(version) <= 64 \
            and type(ttl) is int and 0 < ttl <= 86_400:
        return Held(lease, version, ttl, outcome if outcome in OUTCOMES else "")
    return None
