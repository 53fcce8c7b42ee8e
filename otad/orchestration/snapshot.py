"""The site-orchestration snapshot a gateway reports to the dashboard (the site view, issue 16).

A gateway's orchestrator describes its site (`snapshot(now)`: the budget and its
source, the window, who holds a lease, who waits and why, who deferred); the
gateway's sync thread POSTs it to the dashboard (`POST /sites/orchestration`),
which keeps the latest per site and shows it on /status and the rollout pages.

To the dashboard the body is untrusted input from the network: `parse_snapshot`
reads it strictly and bounded (at most MAX_SNAPSHOT_BYTES, nesting at most
MAX_DEPTH, no duplicate key, no NaN, every field required and no other, ids,
versions and times checked, each reason one printable ASCII line of at most
MAX_REASON characters, no robot with two leases or places or deferrals) and returns the cleaned document,
or raises SnapshotError with one line and the HTTP status to answer. Pure: bytes
in, a dict out. Schema: docs/formats.md, "Site orchestration snapshot".
"""
from __future__ import annotations

import json
import re
from typing import Any

from otad.errors import MalformedMetadata, OtadError
from otad.orchestration import ID
from otad.rollout.plan import _ID as ROLLOUT_ID
from otad.semver import Version
from otad.strictjson import check_depth, loads_strict

MAX_SNAPSHOT_BYTES = 256 * 1024
MAX_DEPTH = 3  # snapshot > list > entry
MAX_REASON = 300
MAX_ROBOTS = 4096  # per list; the size bound holds it far lower in practice
MAX_EPOCH = 2**40
MAX_SLOTS = 100_000  # SITE_MAX_CONCURRENT's own bound (budget.py)
MAX_LEASE = 2**53
SOURCES = ("SITE_MAX_CONCURRENT", "none")  # or "plan <rollout_id>"
_LINE = re.compile(r"[\x20-\x7e]*")
_ZONE = re.compile(r"[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+){0,3}")
_LIMIT = re.compile(r"|0|[1-9][0-9]{0,5}|(0|[1-9][0-9]{0,2})(\.[0-9]{1,2})?%")

FIELDS = ("site", "at", "timezone", "budget", "window", "updating", "waiting", "deferred", "install_estimate_s")
BUDGET = ("limit", "source", "slots", "in_use")
WINDOW = ("spec", "open", "reason")
ENTRIES = {
    "updating": ("robot", "lease", "version", "since", "expires_at"),
    "waiting": ("robot", "ahead", "version", "since", "reason"),
    "deferred": ("robot", "since", "reason", "too_long"),
}


class SnapshotError(OtadError):
    """A refused snapshot: one line, and the HTTP status (400; 403 for another gateway's site)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def parse_snapshot(data: bytes, gateway: str) -> dict:
    """The cleaned snapshot of `gateway`'s site in `data`, or SnapshotError naming the first fault."""
    if len(data) > MAX_SNAPSHOT_BYTES:
        raise SnapshotError(f"snapshot is larger than {MAX_SNAPSHOT_BYTES} bytes", 413)
    check_depth(data, MAX_DEPTH, SnapshotError, "snapshot")
    doc = loads_strict(data, SnapshotError, "snapshot")
    _keys(doc, FIELDS, "snapshot")
    site = doc["site"]
    if not isinstance(site, str) or not ID.fullmatch(site):
        raise SnapshotError(f"snapshot field 'site' {_show(site)} is not a gateway id")
    if site != gateway:
        raise SnapshotError(f"token is for gateway {gateway}, snapshot says site {site!r}", 403)
    zone = doc["timezone"]
    if not isinstance(zone, str) or len(zone) > 64 or not _ZONE.fullmatch(zone):
        raise SnapshotError(f"snapshot field 'timezone' {_show(zone)} is not an IANA zone name")
    estimate = doc["install_estimate_s"]
    if type(estimate) not in (int, float) or not 0 <= estimate <= 10**7:
        raise SnapshotError("snapshot field 'install_estimate_s' must be seconds between 0 and 10000000")
    clean = {"site": site, "at": _time(doc["at"], "snapshot field 'at'"), "timezone": zone,
             "budget": _budget(doc["budget"]), "window": _window(doc["window"]), "install_estimate_s": estimate}
    for name, keys in ENTRIES.items():
        entries = doc[name]
        if not isinstance(entries, list) or len(entries) > MAX_ROBOTS:
            raise SnapshotError(f"snapshot field {name!r} must be a list of at most {MAX_ROBOTS} robots")
        clean[name] = [_entry(entry, keys, f"snapshot {name}[{n}]") for n, entry in enumerate(entries)]
    # One lease or one place in the queue per robot, as the lease table holds them; one deferral each.
    # A lease holder may also have deferred (it said "not ready" before giving its lease back).
    for names in (("updating", "waiting"), ("deferred",)):
        seen: dict[str, str] = {}
        for name in names:
            for entry in clean[name]:
                if entry["robot"] in seen:
                    raise SnapshotError(f"snapshot lists robot {entry['robot']!r} twice ({seen[entry['robot']]} and {name})")
                seen[entry["robot"]] = name
    return clean


def render_snapshot(doc: dict) -> bytes:
    """The bytes the gateway sends (and the dashboard stores): compact, keys sorted."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("ascii")


def _budget(doc: Any) -> dict:
    _keys(doc, BUDGET, "snapshot budget")
    limit, source = doc["limit"], doc["source"]
    if not isinstance(limit, str) or not _LIMIT.fullmatch(limit):
        raise SnapshotError(f"snapshot budget 'limit' {_show(limit)} is not N, P% or empty")
    if not isinstance(source, str) or not (source in SOURCES or (source.startswith("plan ")
                                                                  and ROLLOUT_ID.fullmatch(source[5:]))):
        raise SnapshotError(f"snapshot budget 'source' {_show(source)} is not SITE_MAX_CONCURRENT, none or plan <rollout_id>")
    slots = doc["slots"]
    if slots is not None:
        slots = _whole(slots, 0, MAX_SLOTS, "snapshot budget 'slots'")
    return {"limit": limit, "source": source, "slots": slots,
            "in_use": _whole(doc["in_use"], 0, MAX_ROBOTS, "snapshot budget 'in_use'")}


def _window(doc: Any) -> dict:
    _keys(doc, WINDOW, "snapshot window")
    if type(doc["open"]) is not bool:
        raise SnapshotError("snapshot window 'open' must be true or false")
    return {"spec": _line(doc["spec"], "snapshot window 'spec'", 512), "open": doc["open"],
            "reason": _line(doc["reason"], "snapshot window 'reason'")}


def _entry(doc: Any, keys: tuple[str, ...], where: str) -> dict:
    _keys(doc, keys, where)
    robot = doc["robot"]
    if not isinstance(robot, str) or not ID.fullmatch(robot):
        raise SnapshotError(f"{where} robot {_show(robot)} is not a robot id")
    clean: dict[str, Any] = {"robot": robot}
    for key in keys[1:]:
        value, what = doc[key], f"{where} field {key!r}"
        if key == "version":  # "" when the gateway does not know it (e.g. a lease restored after a restart)
            try:
                if value != "":
                    Version(value)
            except MalformedMetadata:
                raise SnapshotError(f"{what} {_show(value)} is not a release version or empty") from None
        elif key in ("since", "expires_at"):
            value = _time(value, what)
        elif key == "lease":
            value = _whole(value, 1, MAX_LEASE, what)
        elif key == "ahead":
            value = _whole(value, 0, MAX_ROBOTS, what)
        elif key == "reason":
            value = _line(value, what)
        elif type(value) is not bool:  # too_long
            raise SnapshotError(f"{what} must be true or false")
        clean[key] = value
    return clean


def _keys(doc: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(doc, dict):
        raise SnapshotError(f"{where} is not a JSON object")
    missing, extra = set(keys) - set(doc), set(doc) - set(keys)
    if missing:
        raise SnapshotError(f"{where} lacks field {sorted(missing)[0]!r}")
    if extra:
        raise SnapshotError(f"{where} has an unknown field {_show(sorted(extra)[0])}")


def _line(value: Any, what: str, limit: int = MAX_REASON) -> str:
    if not isinstance(value, str) or len(value) > limit or not _LINE.fullmatch(value):
        raise SnapshotError(f"{what} must be one line of at most {limit} printable ASCII characters")
    return value


def _whole(value: Any, low: int, high: int, what: str) -> int:
    if type(value) is not int or not low <= value <= high:
        raise SnapshotError(f"{what} must be a whole number between {low} and {high}")
    return value


def _time(value: Any, what: str) -> float:
    if type(value) not in (int, float) or not 0 <= value <= MAX_EPOCH:
        raise SnapshotError(f"{what} must be a time in seconds between 0 and {MAX_EPOCH}")
    return value


def _show(value: Any) -> str:
    """A value for a one-line error: repr, cut short (repr escapes newlines and control characters)."""
    return repr(value)[:42]
