"""Telemetry records: the one validator, used by the agent, the gateway and the dashboard.

A record is a JSON object. Common identity: `robot_id`, `boot_id`, `seq`
(strictly increasing per robot and boot), `ts` (RFC 3339 UTC, the robot's
clock), `type`. A metric adds `cpu`, `mem` (percent), `version`, `health`
(ok | degraded | failed); an event adds `event`, `version`, `detail`; a
`dropped` record (made by an agent whose spool hit its bound) adds `dropped`,
the number of records it deleted unsent. An event of an install that a signed
rollout plan assigned also carries `rollout_id` and `phase` (both or neither). A gap (made by a gateway whose
buffer overflowed) is not a robot record; the dashboard validates it (otad/dashboard/ingest.py). See docs/formats.md.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from otad.errors import OtadError
from otad.rollout.plan import MAX_PHASES

MAX_BODY_BYTES = 1024 * 1024
MAX_RECORDS = 1000
HEALTH = ("ok", "degraded", "failed")
EVENTS = ("installed", "committed", "rolled_back", "blacklisted", "rejected", "started", "gap")
MAX_PHASE = MAX_PHASES - 1
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_BOOT_ID = re.compile(r"[A-Za-z0-9-]{1,64}")
_TS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z")
_VERSION = re.compile(r"[0-9A-Za-z.+-]{0,64}")
MAX_SEQ = 2**62


class RecordError(OtadError):
    """A record or a batch is malformed; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _require(doc: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in doc:
        raise RecordError(f"{where}: missing field '{key}'")
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise RecordError(f"{where}: field '{key}' has the wrong type")
    return value


def _matching(doc: dict, key: str, pattern: re.Pattern[str], where: str) -> str:
    value = _require(doc, key, str, where)
    if not pattern.fullmatch(value):
        raise RecordError(f"{where}: field '{key}' is invalid")
    return value


def _percent(doc: dict, key: str, where: str) -> float:
    value = _require(doc, key, (int, float), where)
    if not 0 <= value <= 100 or not math.isfinite(value):  # range first: a 400-digit int overflows isfinite
        raise RecordError(f"{where}: field '{key}' must be a percentage 0-100")
    return float(value)


def _rollout_fields(doc: dict, where: str) -> dict:
    """The optional rollout_id and phase of an event (issue 15's Wire 3): both, or neither."""
    present = [key for key in ("rollout_id", "phase") if key in doc]
    if not present:
        return {}
    if len(present) == 1:
        raise RecordError(f"{where}: field '{present[0]}' needs its partner ('rollout_id' and 'phase' go together)")
    phase = _require(doc, "phase", int, where)
    if not 0 <= phase <= MAX_PHASE:
        raise RecordError(f"{where}: field 'phase' must be a phase index 0-{MAX_PHASE}")
    return {"rollout_id": _matching(doc, "rollout_id", _ID, where), "phase": phase}


def validate_record(doc: object, where: str = "record") -> dict:
    """Return the record with only its known fields, or raise RecordError naming the problem."""
    if not isinstance(doc, dict):
        raise RecordError(f"{where}: not a JSON object")
    kind = _require(doc, "type", str, where)
    seq = _require(doc, "seq", int, where)
    if not 0 <= seq < MAX_SEQ:
        raise RecordError(f"{where}: field 'seq' is out of range")
    clean = {
        "robot_id": _matching(doc, "robot_id", _ID, where),
        "boot_id": _matching(doc, "boot_id", _BOOT_ID, where),
        "seq": seq,
        "ts": _matching(doc, "ts", _TS, where),
        "type": kind,
    }
    if kind == "metric":
        clean["cpu"] = _percent(doc, "cpu", where)
        clean["mem"] = _percent(doc, "mem", where)
        clean["version"] = _matching(doc, "version", _VERSION, where)
        health = _require(doc, "health", str, where)
        if health not in HEALTH:
            raise RecordError(f"{where}: field 'health' must be one of {', '.join(HEALTH)}")
        clean["health"] = health
    elif kind == "event":
        event = _require(doc, "event", str, where)
        if event not in EVENTS or event == "gap":
            raise RecordError(f"{where}: unknown event {event[:40]!r}")
        clean["event"] = event
        clean["version"] = _matching(doc, "version", _VERSION, where)
        detail = _require(doc, "detail", str, where)
        if len(detail) > 2000:
            raise RecordError(f"{where}: field 'detail' is longer than 2000 characters")
        clean["detail"] = detail
        clean.update(_rollout_fields(doc, where))
    elif kind == "dropped":
        dropped = _require(doc, "dropped", int, where)
        if not 0 < dropped < MAX_SEQ:
            raise RecordError(f"{where}: field 'dropped' must be a positive whole number")
        clean["dropped"] = dropped
    else:
        raise RecordError(f"{where}: unknown type {kind[:40]!r}")
    return clean


def parse_batch(body: bytes, max_bytes: int = MAX_BODY_BYTES, max_records: int = MAX_RECORDS) -> list[dict]:
    """POST /metrics body: one record, or {"records": [...]}."""
    if len(body) > max_bytes:
        raise RecordError(f"body is larger than {max_bytes} bytes", 413)
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RecordError("body is not valid JSON") from None
    if isinstance(doc, dict) and "records" in doc:
        records = doc["records"]
        if not isinstance(records, list):
            raise RecordError("'records' is not a list")
        if len(records) > max_records:
            raise RecordError(f"more than {max_records} records in one request", 413)
        if not records:
            raise RecordError("'records' is empty")
        return [validate_record(r, f"record {i}") for i, r in enumerate(records)]
    return [validate_record(doc)]


def encode(record: dict) -> str:
    return json.dumps(record, separators=(",", ":"), sort_keys=True)
