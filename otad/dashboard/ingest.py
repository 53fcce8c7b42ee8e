"""POST /metrics at the dashboard: authenticated, bounded, validated, idempotent.

Body (from a gateway's forwarder, usually gzip): {"gateway_id", "buffer_id",
"backlog", "records": [{"id", "received", "record"}]}. Answer: {"acked": N},
the highest gateway row id now held; the gateway deletes up to it.
"""
from __future__ import annotations

import json
import re
import zlib

from otad.telemetry.records import MAX_RECORDS, RecordError, validate_record
from otad.telemetry.tokens import TokenTable, bearer

MAX_WIRE_BYTES = 4 * 1024 * 1024  # compressed or not, as sent
MAX_JSON_BYTES = 16 * 1024 * 1024  # after decompression: a gzip bomb stops here
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_BUFFER_ID = re.compile(r"[0-9a-f]{1,64}")
_TS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z")


class IngestError(RecordError):
    """`extra` goes into the JSON answer beside "error": "record_id" names the refused row (the gateway
    quarantines it), "conflict" says why a batch was refused as inconsistent with what is held."""

    def __init__(self, message: str, status: int = 400, **extra: object) -> None:
        super().__init__(message, status)
        self.extra = extra


def authenticate(tokens: TokenTable | None, header: str | None) -> str:
    gateway = tokens.identify(bearer(header) or "") if tokens is not None else None
    if gateway is None:
        raise IngestError("missing or wrong bearer token", 401)
    return gateway


def decode_body(body: bytes, encoding: str | None) -> bytes:
    if not encoding or encoding == "identity":
        return body
    if encoding != "gzip":
        raise IngestError(f"unsupported Content-Encoding {encoding[:20]!r}", 415)
    inflater = zlib.decompressobj(wbits=31)
    try:
        data = inflater.decompress(body, MAX_JSON_BYTES + 1)
    except zlib.error:
        raise IngestError("body is not valid gzip") from None
    if len(data) > MAX_JSON_BYTES or inflater.unconsumed_tail:
        raise IngestError(f"decompressed body is larger than {MAX_JSON_BYTES} bytes", 413)
    if not inflater.eof:
        raise IngestError("body is not valid gzip (the stream is truncated)")
    return data


def parse_forwarded(data: bytes, gateway: str, report: dict | None = None) -> tuple[str, int, list[dict]]:
    """Return (buffer_id, backlog, rows) or raise IngestError naming the problem (and the row).

    `report`, if given, receives the gateway's own counters: "quarantined" (0 if not sent)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise IngestError("body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise IngestError("body is not a JSON object")
    if not isinstance(doc.get("gateway_id"), str):
        raise IngestError("'gateway_id' is missing or not a string")
    if doc["gateway_id"] != gateway:
        raise IngestError(f"token is for gateway {gateway}, body says {str(doc.get('gateway_id'))[:64]!r}", 403)
    buffer_id, backlog, rows = doc.get("buffer_id"), doc.get("backlog", 0), doc.get("records")
    if not isinstance(buffer_id, str) or not _BUFFER_ID.fullmatch(buffer_id):
        raise IngestError("'buffer_id' is missing or invalid")
    if not isinstance(backlog, int) or isinstance(backlog, bool) or backlog < 0:
        raise IngestError("'backlog' must be a whole number")
    quarantined = doc.get("quarantined", 0)
    if not isinstance(quarantined, int) or isinstance(quarantined, bool) or not 0 <= quarantined < 2**62:
        raise IngestError("'quarantined' must be a whole number")
    if report is not None:
        report["quarantined"] = quarantined
    if not isinstance(rows, list) or not rows:
        raise IngestError("'records' must be a non-empty list")
    if len(rows) > MAX_RECORDS:
        raise IngestError(f"more than {MAX_RECORDS} records in one request", 413)
    return buffer_id, backlog, [_row(row, i) for i, row in enumerate(rows)]


def _row(row: object, index: int) -> dict:
    where = f"records[{index}]"
    if not isinstance(row, dict):
        raise IngestError(f"{where}: not a JSON object")
    row_id, received, record = row.get("id"), row.get("received"), row.get("record")
    if not isinstance(row_id, int) or isinstance(row_id, bool) or not 0 < row_id < 2**62:
        raise IngestError(f"{where}: 'id' must be a positive whole number")
    if not isinstance(received, (int, float)) or isinstance(received, bool) or not 0 <= received < 1e11:
        raise IngestError(f"{where}: 'received' must be a time in seconds")
    try:
        clean = _gap(record, where) if isinstance(record, dict) and record.get("type") == "gap" else validate_record(record, where)
    except RecordError as exc:
        raise IngestError(str(exc), record_id=row_id) from None
    return {"id": row_id, "received": float(received), "record": clean}


def _gap(record: dict, where: str) -> dict:
    fields = {key: record.get(key) for key in ("dropped", "first_id", "last_id")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in fields.values()):
        raise IngestError(f"{where}: gap fields must be whole numbers")
    ts = record.get("ts")
    if not isinstance(ts, str) or not _TS.fullmatch(ts):
        raise IngestError(f"{where}: gap 'ts' is invalid")
    # Which robots lost the records, and why (gateways of before 0.x send neither).
    robots, reason = record.get("robots", {}), record.get("reason", "buffer_full")
    if (not isinstance(robots, dict) or len(robots) > MAX_RECORDS
            or not all(isinstance(k, str) and _ID.fullmatch(k) and isinstance(v, int) and not isinstance(v, bool)
                       and v > 0 for k, v in robots.items())
            or (robots and sum(robots.values()) != fields["dropped"])):
        raise IngestError(f"{where}: gap 'robots' must map robot ids to counts that add up to 'dropped'")
    if reason != "buffer_full":
        raise IngestError(f"{where}: gap 'reason' must be buffer_full")
    return {"type": "gap", "ts": ts, **fields, "robots": robots, "reason": reason}
