"""The robot's rollout gate: install a release only if a current signed plan assigns it here.

Active only with ROLLOUT_KEYS (issue 15; docs/security.md "Rollout plans"). Each
poll the worker fetches `GET /rollout.json` from its gateway (Wire 2 of
notes/ROLLOUT-WIRE.md, docs/formats.md) and hands the body here. Every plan in it
is verified with otad.rollout.signed (ROLLOUT_KEYS, never a release key; expiry
with MANIFEST_GRACE_S of tolerance, as for manifests, so a site cut off from the
dashboard keeps its plan) and passed through the anti-replay rule
(check_revision), whose state is persisted atomically in STATE_DIR before any
plan is acted on: a revision older than one seen, even before a restart, is
refused. The offered version is then checked with otad.rollout.cohort.may_install
against the robot's own cohort, phase and `from` version.

The gateway decides which phases are open (it holds the evidence and the clock
of the rollout), so the robot counts every phase of an active plan as open: a
compromised gateway can start phases early (more install slots), never offer a
version outside the plan or to a robot outside its cohort.

An aborted plan with on_halt=rollback assigns a robot on the target the version
it came from, which this robot recorded itself when the plan installed the
target (RobotState.rollout["came_from"]); that return is the one downgrade a plan
authorises (worker.py), and only to that release, which must still verify under
TRUSTED_KEYS and be unexpired.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from otad.errors import OtadError, TrustError
from otad.fsutil import atomic_write_bytes
from otad.rollout.cohort import may_install
from otad.rollout.plan import MAX_PLAN_BYTES, PlanError
from otad.rollout.signed import SeenRevision, VerifiedPlan, check_revision, parse_seen, render_seen, verify_plan
from otad.trust.keys import PublicKey

log = logging.getLogger("otad.robot")
ROLLOUT_PATH = "/rollout.json"
MAX_PLANS = 32  # plans that concern one robot at once; a gateway sends a handful
MAX_ROLLOUT_BYTES = MAX_PLANS * (MAX_PLAN_BYTES + 8 * 1024)
SEEN_FILE = "rollout-seen.json"


class RolloutRefused(TrustError):
    """No current signed plan assigns the offered version to this robot."""


@dataclass(frozen=True)
class Admission:
    """Why a plan lets this robot install `version`."""

    version: str
    rollout_id: str
    phase: int
    revision: int
    rollback: bool  # back to the version this robot came from (aborted, on_halt=rollback)
    reason: str
    force_after_s: int | None = None  # the plan's: a robot deferred by READY_CMD this long installs anyway

    @property
    def tag(self) -> dict:
        """The fields its events carry (Wire 3)."""
        return {"rollout_id": self.rollout_id, "phase": self.phase}


class RolloutGate:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / SEEN_FILE
        self.seen = self._load()
        self._logged: str | None = None  # digest of the last /rollout.json whose refusals were logged

    def _load(self) -> dict[str, SeenRevision]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise OtadError(f"{self.path}: unreadable ({exc.strerror})") from None
        try:
            return parse_seen(data)
        except PlanError as exc:
            # Never start afresh silently: an empty state would let every old revision in again.
            raise OtadError(f"{self.path}: {exc}; move it aside only if no gateway can replay old plans") from None

    def current_plans(self, body: bytes | None, rollout_keys: tuple[PublicKey, ...], release_keys: tuple[PublicKey, ...],
                      now: float, grace: float) -> list[VerifiedPlan]:
        """The plans in a /rollout.json body that verify and are the newest revision seen.

        None (the gateway has no /rollout.json) is no plan. Refusals are logged once per body.
        """
        digest = hashlib.sha256(body or b"").hexdigest()
        quiet, self._logged = self._logged == digest, digest
        if body is None:
            return []
        try:
            items = _items(body)
        except PlanError as exc:
            if not quiet:
                log.warning("refused the gateway's %s: %s", ROLLOUT_PATH, exc)
            return []
        plans, seen = [], dict(self.seen)
        for number, (data, bundle) in enumerate(items):
            try:
                verified = verify_plan(data, bundle, rollout_keys, now, release_keys=release_keys, grace=grace)
            except TrustError as exc:  # PlanError is a MalformedMetadata, a TrustError
                if not quiet:
                    log.warning("refused rollout plan %d of %s: %s", number, ROLLOUT_PATH, exc)
                continue
            decision, seen = check_revision(seen, verified)
            if not decision.accepted:
                if not quiet:
                    log.warning("refused rollout plan %s revision %d: %s", verified.plan.rollout_id,
                                verified.plan.revision, decision.reason)
                continue
            plans.append(verified)
        if seen != self.seen:
            # Persisted before any plan is acted on: after a power cut the robot still knows
            # the newest revision it took, so the older one cannot come back.
            atomic_write_bytes(self.path, render_seen(seen))
            self.seen = seen
        # A plan a later item of the same body superseded is not current.
        return [p for p in plans if self.seen[p.plan.rollout_id].sha256 == p.sha256]

    @staticmethod
    def admit(plans: list[VerifiedPlan], robot_id: str, current: str | None, offered: str,
              came_from: str | None) -> Admission:
        """The plan that assigns `offered` to this robot, or RolloutRefused naming why none does."""
        reasons = []
        for verified in plans:
            plan = verified.plan
            decided = may_install(plan, robot_id, current, len(plan.phases), offered, came_from=came_from)
            if decided.version is not None and decided.phase is not None:
                return Admission(decided.version, plan.rollout_id, decided.phase, plan.revision, decided.rollback,
                                 decided.reason, plan.force_after_s)
            reasons.append(f"rollout {plan.rollout_id} revision {plan.revision}: {decided.reason}")
        if not reasons:
            raise RolloutRefused(f"no current signed rollout plan assigns {offered} to {robot_id}")
        raise RolloutRefused("; ".join(reasons)[:1000])


def _items(body: bytes) -> list[tuple[bytes, bytes]]:
    """(plan bytes, bundle bytes) of each item of `{"plans": [{"plan": str, "bundle": object}]}`."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise PlanError("not valid JSON") from None
    plans = doc.get("plans") if isinstance(doc, dict) else None
    if not isinstance(plans, list) or set(doc) != {"plans"}:
        raise PlanError("expected an object with only a 'plans' list")
    if len(plans) > MAX_PLANS:
        raise PlanError(f"more than {MAX_PLANS} plans")
    items = []
    for number, item in enumerate(plans):
        if not (isinstance(item, dict) and set(item) == {"plan", "bundle"} and isinstance(item["plan"], str)
                and isinstance(item["bundle"], dict)):
            raise PlanError(f"plan {number}: expected {{\"plan\": string, \"bundle\": object}}")
        try:
            data = item["plan"].encode("ascii")
        except UnicodeEncodeError:
            raise PlanError(f"plan {number}: not in canonical form (ASCII)") from None
        items.append((data, json.dumps(item["bundle"]).encode()))
    return items

