"""Wire 5 (docs/formats.md "Wire 5: install leases"): the strict reader of a robot's POST /lease body.

One JSON object of at most MAX_BODY_BYTES, nesting at most MAX_DEPTH, no
duplicate key, no NaN, no key the operation does not take: a robot that sends
something else has a bug, and guessing what it meant could grant a lease nobody
asked for. Every refusal is one line (LeaseRequestError, HTTP 400).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from otad.errors import OtadError
from otad.orchestration.leases import MAX_COUNTER, OUTCOMES
from otad.semver import MAX_VERSION_LEN, parse_version
from otad.strictjson import check_depth, loads_strict

MAX_BODY_BYTES = 4096
MAX_DEPTH = 2
MAX_REASON = 200
OPS = {  # op -> (required keys, optional keys)
    "request": (("op", "version"), ()),
    "renew": (("op", "lease"), ()),
    "release": (("op", "lease", "outcome"), ()),
    "defer": (("op", "reason"), ("too_long",)),
}
_PRINTABLE = re.compile(r"[\x20-\x7e]*")


class LeaseRequestError(OtadError):
    """A POST /lease body is not a Wire 5 request (one line; answered 400)."""


@dataclass(frozen=True)
class LeaseRequest:
    op: str
    version: str = ""  # request
    lease: int = 0  # renew, release
    outcome: str = ""  # release
    reason: str = ""  # defer
    too_long: bool = False  # defer


def parse_lease_request(data: bytes) -> LeaseRequest:
    """The request these bytes hold, or LeaseRequestError naming the first thing wrong."""
    if len(data) > MAX_BODY_BYTES:
        raise LeaseRequestError(f"lease request is larger than {MAX_BODY_BYTES} bytes")
    check_depth(data, MAX_DEPTH, LeaseRequestError, "lease request")
    doc = loads_strict(data, LeaseRequestError, "lease request")
    if not isinstance(doc, dict):
        raise LeaseRequestError("lease request is not a JSON object")
    op = doc.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise LeaseRequestError(f"lease request field 'op' {_shown(op)} is not one of {', '.join(OPS)}")
    required, optional = OPS[op]
    missing = [k for k in required if k not in doc]
    extra = sorted(k for k in doc if k not in required and k not in optional)
    if missing:
        raise LeaseRequestError(f"lease request '{op}' lacks field {missing[0]!r}")
    if extra:
        raise LeaseRequestError(f"lease request '{op}' has an unknown field {_shown(extra[0])}")
    if op == "request":
        return LeaseRequest(op, version=_version(doc["version"]))
    if op == "renew":
        return LeaseRequest(op, lease=_lease_id(doc["lease"]))
    if op == "release":
        outcome = doc["outcome"]
        if not isinstance(outcome, str) or outcome not in OUTCOMES:
            raise LeaseRequestError(f"lease request field 'outcome' {_shown(outcome)} is not one of {', '.join(OUTCOMES)}")
        return LeaseRequest(op, lease=_lease_id(doc["lease"]), outcome=outcome)
    reason, too_long = doc["reason"], doc.get("too_long", False)
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON or not _PRINTABLE.fullmatch(reason):
        raise LeaseRequestError(f"lease request field 'reason' must be one line of 1 to {MAX_REASON} printable ASCII characters")
    if type(too_long) is not bool:
        raise LeaseRequestError("lease request field 'too_long' must be true or false")
    return LeaseRequest(op, reason=reason.strip(), too_long=too_long)


def _version(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_VERSION_LEN:
        raise LeaseRequestError(f"lease request field 'version' must be a version of at most {MAX_VERSION_LEN} characters")
    try:
        parse_version(value)
    except (OtadError, ValueError):
        raise LeaseRequestError(f"lease request field 'version' {_shown(value)} is not a version like 1.2.0") from None
    return value


def _lease_id(value: Any) -> int:
    if type(value) is not int or not 1 <= value < MAX_COUNTER:
        raise LeaseRequestError(f"lease request field 'lease' must be a whole number between 1 and {MAX_COUNTER - 1}")
    return value


def _shown(value: Any) -> str:
    """A hostile value in an error line: short, and printable (repr escapes control characters)."""
    text = repr(value)
    return text if len(text) <= 42 else text[:40] + "..."
