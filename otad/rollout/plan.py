"""The rollout plan: who may install which release when, parsed strictly. See docs/formats.md.

A plan is signed by the rollout key (signed.py) and read by the dashboard, the
gateways and the robots, so this is the one reader. Unlike the manifest, an
unknown field is refused: a plan restricts what robots may do, and a field an
old reader skipped could be the restriction that mattered. A newer format gets
a new `schema` number. Every refusal is a `PlanError` with a one-line reason.

Bounds keep hostile bytes cheap: at most MAX_PLAN_BYTES, JSON nesting at most
MAX_DEPTH (checked before json.loads builds anything), MAX_PHASES phases,
MAX_ROBOTS explicit robot ids, no duplicate keys, no NaN or Infinity.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any

from otad.errors import MalformedMetadata
from otad.orchestration import OrchestrationError
from otad.orchestration.budget import parse_limit
from otad.orchestration.windows import parse_windows
from otad.semver import Version
from otad.strictjson import check_depth, loads_strict
from otad.trust.manifest import timestamp_epoch

SCHEMA = 1
MAX_PLAN_BYTES = 64 * 1024
MAX_DEPTH = 6  # plan > phases > phase > halt > scope: 5 levels of containers
MAX_PHASES = 16
MAX_ROBOTS = 1000  # explicit ids, all phases together; percentages name the rest
MAX_FROM = 32
MAX_REVISION = 2**53  # exact in every JSON reader
MAX_SECONDS = 365 * 86400
MAX_REASON = 200
ADVANCE = ("auto", "approve")
ON_HALT = ("pause", "rollback")
OFFLINE_POLICY = ("continue", "hold")
STATES = ("active", "paused", "aborted")
# Rollout and robot ids are the telemetry's ids (records.py): one safe path component.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_REASON = re.compile(r"[\x20-\x7e]*")


class PlanError(MalformedMetadata):
    """The bytes are not a well-formed rollout plan (bad input, not a trust verdict)."""


@dataclass(frozen=True)
class Criteria:
    """Halt when more than `max_failures` robots failed, or (after `min_attempts`
    finished installs) when the failed share exceeds `max_failure_rate`."""

    max_failures: int | None = None
    max_failure_rate: float | None = None
    min_attempts: int = 1


@dataclass(frozen=True)
class Phase:
    robots: tuple[str, ...] = ()  # explicit ids, in this phase whatever their hash
    percent: float = 0  # cumulative share of the targeted robots, 0..100
    min_soak_s: int = 0
    advance: str = "auto"  # how the NEXT phase may start after this one soaked
    fleet: Criteria | None = None
    site: Criteria | None = None


@dataclass(frozen=True)
class Plan:
    rollout_id: str
    revision: int
    expires: str  # RFC 3339 UTC, whole seconds
    version: str  # the target release
    phases: tuple[Phase, ...]
    install_timeout_s: int
    on_halt: str = "pause"
    offline_policy: str = "hold"
    offline_max_phase: int = 0  # highest phase index a dark site may open under `continue`
    state: str = "active"
    approved_phase: int = 0  # highest phase index an operator approved (for `approve` gates)
    from_versions: tuple[str, ...] = ()  # empty: any robot is targeted
    reason: str = ""  # why the state is what it is (a halt's reason)
    halt_since: str = ""  # RFC 3339 UTC; halt criteria judge only outcomes from then on ("": all)
    # Site orchestration (issue 16): what the plan's author sets for every site; "" / None: the gateway's own.
    site_max_concurrent: str = ""  # replaces the gateway's SITE_MAX_CONCURRENT for this rollout
    windows: str = ""  # replaces the gateway's MAINTENANCE_WINDOWS (in each site's SITE_TIMEZONE)
    force_after_s: int | None = None  # a robot deferred by READY_CMD this long installs anyway

    @property
    def expires_epoch(self) -> float:
        return timestamp_epoch(self.expires)

    @property
    def halt_since_epoch(self) -> float:
        return timestamp_epoch(self.halt_since) if self.halt_since else 0.0


def parse_plan(data: bytes) -> Plan:
    if not isinstance(data, bytes):
        raise PlanError("plan is not bytes")
    if len(data) > MAX_PLAN_BYTES:
        raise PlanError(f"plan is larger than {MAX_PLAN_BYTES} bytes")
    _check_depth(data)
    return plan_from_doc(loads_strict(data, PlanError, "plan"))


def plan_from_doc(doc: Any) -> Plan:
    """A Plan from already-decoded JSON (what the console's form or a test builds)."""
    if not isinstance(doc, dict):
        raise PlanError("plan is not a JSON object")
    fields = _Fields(doc, "plan")
    schema = fields.integer("schema", 0, 2**31)
    if schema != SCHEMA:
        raise PlanError(f"plan schema {schema} is not supported (expected {SCHEMA})")
    phases_doc = fields.take("phases", list)
    if not 1 <= len(phases_doc) <= MAX_PHASES:
        raise PlanError(f"plan field 'phases' must hold 1 to {MAX_PHASES} phases")
    phases = tuple(_phase(p, n) for n, p in enumerate(phases_doc))
    plan = Plan(
        rollout_id=fields.matching("rollout_id", _ID),
        revision=fields.integer("revision", 1, MAX_REVISION),
        expires=fields.matching("expires", _RFC3339_UTC),
        version=fields.version("version"),
        phases=phases,
        install_timeout_s=fields.integer("install_timeout_s", 1, MAX_SECONDS),
        on_halt=fields.choice("on_halt", ON_HALT, "pause"),
        offline_policy=fields.choice("offline_policy", OFFLINE_POLICY, "hold"),
        offline_max_phase=fields.integer("offline_max_phase", 0, len(phases) - 1, 0),
        state=fields.choice("state", STATES, "active"),
        approved_phase=fields.integer("approved_phase", 0, len(phases) - 1, 0),
        from_versions=_from_versions(fields),
        reason=fields.reason(),
        halt_since=fields.matching("halt_since", _RFC3339_UTC, ""),
        site_max_concurrent=_orchestration(fields, "site_max_concurrent", lambda text: parse_limit(text, "value")),
        windows=_orchestration(fields, "windows", parse_windows),
        force_after_s=fields.integer("force_after_s", 0, MAX_SECONDS, None),
    )
    fields.done()
    for name in ("expires", "halt_since"):
        try:
            if getattr(plan, name):
                timestamp_epoch(getattr(plan, name))  # a real date, not 2026-13-45
        except MalformedMetadata:
            raise PlanError(f"plan field '{name}' is not a valid date {getattr(plan, name)!r}") from None
    _check_phases(plan)
    return plan


def render_plan(plan: Plan) -> bytes:
    """The canonical bytes of a plan: what is signed, and the only form verify accepts."""
    doc = {
        "schema": SCHEMA, "rollout_id": plan.rollout_id, "revision": plan.revision, "expires": plan.expires,
        "version": plan.version, "from": list(plan.from_versions), "phases": [_phase_doc(p) for p in plan.phases],
        "install_timeout_s": plan.install_timeout_s, "on_halt": plan.on_halt, "offline_policy": plan.offline_policy,
        "offline_max_phase": plan.offline_max_phase, "state": plan.state, "approved_phase": plan.approved_phase,
        "reason": plan.reason,
    }
    if plan.halt_since:  # absent unless a resume set it: plans signed before the field stay canonical
        doc["halt_since"] = plan.halt_since
    # Absent unless set, for the same reason.
    for name in ("site_max_concurrent", "windows", "force_after_s"):
        if getattr(plan, name) not in ("", None):
            doc[name] = getattr(plan, name)
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def revise(plan: Plan, **changes: Any) -> Plan:
    """The next revision (revision + 1) with `changes` (state, reason, approved_phase, criteria...):
    how pause, resume, approve and abort are made. It goes through the parser, so a
    revision can never be a plan that readers would refuse."""
    if "revision" in changes:
        raise PlanError("revise sets the revision itself (one more than the plan's)")
    return parse_plan(render_plan(replace(plan, revision=plan.revision + 1, **changes)))


def _phase_doc(phase: Phase) -> dict:
    doc: dict[str, Any] = {"robots": list(phase.robots), "percent": phase.percent, "min_soak_s": phase.min_soak_s,
                           "advance": phase.advance}
    halt = {scope: _criteria_doc(c) for scope, c in (("fleet", phase.fleet), ("site", phase.site)) if c is not None}
    doc["halt"] = halt
    return doc


def _criteria_doc(criteria: Criteria) -> dict:
    doc: dict[str, Any] = {"min_attempts": criteria.min_attempts}
    if criteria.max_failures is not None:
        doc["max_failures"] = criteria.max_failures
    if criteria.max_failure_rate is not None:
        doc["max_failure_rate"] = criteria.max_failure_rate
    return doc


def _phase(doc: Any, n: int) -> Phase:
    where = f"phase {n}"
    if not isinstance(doc, dict):
        raise PlanError(f"plan {where} is not a JSON object")
    fields = _Fields(doc, f"plan {where}")
    robots = fields.take("robots", list, [])
    if not all(isinstance(r, str) and _ID.fullmatch(r) for r in robots):
        raise PlanError(f"plan {where} field 'robots' must be a list of robot ids")
    if len(set(robots)) != len(robots):
        raise PlanError(f"plan {where} names a robot twice")
    halt = fields.take("halt", dict, {})
    unknown = set(halt) - {"fleet", "site"}
    if unknown:
        raise PlanError(f"plan {where} field 'halt' has an unknown scope {sorted(unknown)[0][:40]!r}")
    phase = Phase(
        robots=tuple(robots),
        percent=fields.number("percent", 0, 100, 0),
        min_soak_s=fields.integer("min_soak_s", 0, MAX_SECONDS, 0),
        advance=fields.choice("advance", ADVANCE, "auto"),
        fleet=_criteria(halt.get("fleet"), f"{where} halt.fleet"),
        site=_criteria(halt.get("site"), f"{where} halt.site"),
    )
    fields.done()
    return phase


def _criteria(doc: Any, where: str) -> Criteria | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise PlanError(f"plan {where} is not a JSON object")
    fields = _Fields(doc, f"plan {where}")
    criteria = Criteria(
        max_failures=fields.integer("max_failures", 0, 2**31, None),
        max_failure_rate=fields.number("max_failure_rate", 0, 1, None),
        min_attempts=fields.integer("min_attempts", 1, 2**31, 1),
    )
    fields.done()
    if criteria.max_failures is None and criteria.max_failure_rate is None:
        raise PlanError(f"plan {where} needs max_failures or max_failure_rate")
    return criteria


def _from_versions(fields: "_Fields") -> tuple[str, ...]:
    versions = fields.take("from", list, [])
    if len(versions) > MAX_FROM:
        raise PlanError(f"plan field 'from' holds more than {MAX_FROM} versions")
    for text in versions:
        if not isinstance(text, str):
            raise PlanError("plan field 'from' must be a list of versions")
        _version(text, "from")
    if len(set(versions)) != len(versions):
        raise PlanError("plan field 'from' names a version twice")
    return tuple(versions)


def _check_phases(plan: Plan) -> None:
    if plan.version in plan.from_versions:
        raise PlanError(f"plan targets {plan.version}, which is also one of its 'from' versions")
    seen: set[str] = set()
    last_percent: float = 0
    for n, phase in enumerate(plan.phases):
        if seen & set(phase.robots):
            raise PlanError(f"plan phase {n} names a robot an earlier phase already holds")
        seen |= set(phase.robots)
        if phase.percent < last_percent:
            raise PlanError(f"plan phase {n} percent {phase.percent} is below an earlier phase's {last_percent} (percentages are cumulative)")
        last_percent = phase.percent
        if not phase.robots and phase.percent == 0:
            raise PlanError(f"plan phase {n} adds no robot (no ids, percent 0)")
    if len(seen) > MAX_ROBOTS:
        raise PlanError(f"plan names more than {MAX_ROBOTS} robots")


class _Fields:
    """Typed reads of one JSON object, refusing what is left over (strict schema)."""

    def __init__(self, doc: dict, where: str) -> None:
        self.doc, self.where, self.read = doc, where, set()

    def take(self, key: str, kind: type, default: Any = ...) -> Any:
        self.read.add(key)
        if key not in self.doc:
            if default is ...:
                raise PlanError(f"{self.where} lacks required field '{key}'")
            return default
        value = self.doc[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            name = "number" if isinstance(kind, tuple) else kind.__name__
            raise PlanError(f"{self.where} field '{key}' must be of type {name}")
        return value

    def integer(self, key: str, low: int, high: int, default: Any = ...) -> Any:
        value = self.take(key, int, default)
        if key in self.doc and not low <= value <= high:
            raise PlanError(f"{self.where} field '{key}' must be between {low} and {high}")
        return value

    def number(self, key: str, low: float, high: float, default: Any = ...) -> Any:
        value = self.take(key, (int, float), default)  # type: ignore[arg-type]
        if key in self.doc and not low <= value <= high:
            raise PlanError(f"{self.where} field '{key}' must be between {low} and {high}")
        return value

    def matching(self, key: str, pattern: re.Pattern[str], default: Any = ...) -> str:
        value = self.take(key, str, default)
        if key in self.doc and not pattern.fullmatch(value):
            raise PlanError(f"{self.where} field '{key}' has an invalid value {value[:80]!r}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.take(key, str, default)
        if value not in choices:
            raise PlanError(f"{self.where} field '{key}' must be one of {', '.join(choices)}")
        return value

    def version(self, key: str) -> str:
        return _version(self.take(key, str), key)

    def reason(self) -> str:
        value = self.take("reason", str, "")
        if len(value) > MAX_REASON or not _REASON.fullmatch(value):
            raise PlanError(f"{self.where} field 'reason' must be one line of at most {MAX_REASON} printable ASCII characters")
        return value

    def done(self) -> None:
        unknown = set(self.doc) - self.read
        if unknown:
            raise PlanError(f"{self.where} has an unknown field {sorted(unknown)[0][:40]!r}")


def _orchestration(fields: _Fields, key: str, parse: Any) -> str:
    """A site-orchestration text field, checked with the gateway's own parser (otad/orchestration)."""
    value = fields.take(key, str, "")
    if key in fields.doc:
        try:
            parse(value)
        except OrchestrationError as exc:
            raise PlanError(f"plan field '{key}': {exc}") from None
    return value


def _version(text: str, field: str) -> str:
    try:
        Version(text)
    except MalformedMetadata:
        raise PlanError(f"plan field '{field}' has an invalid version {text[:40]!r}") from None
    return text


def _check_depth(data: bytes) -> None:
    """Refuse deep nesting before json.loads recurses into it."""
    check_depth(data, MAX_DEPTH, PlanError, "plan")
