"""What to answer to a GET/HEAD for a file: conditional requests and single byte ranges.

Pure: given the request's headers and the file's validators, `plan_response`
returns the status, the byte span to send and the headers to set. Follows
RFC 9110: If-None-Match (weak comparison) wins over If-Modified-Since; a
Range is honoured only on GET and, with If-Range, only while the validator
still matches (strong comparison); several ranges get the whole file (allowed,
and the common client never asks for them); an unparseable Range is ignored.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.utils import formatdate, parsedate_to_datetime

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
MAX_VALIDATOR_LEN = 1024


@dataclass(frozen=True)
class Validators:
    size: int
    etag: str  # quoted strong ETag, e.g. '"ab12..."'
    mtime: int  # seconds since the epoch

    @property
    def last_modified(self) -> str:
        return formatdate(self.mtime, usegmt=True)


@dataclass(frozen=True)
class Plan:
    status: int
    start: int = 0
    length: int = 0  # bytes of the file to send (0 for 304/416 and HEAD bodies count separately)
    headers: list[tuple[str, str]] = field(default_factory=list)


def content_etag(hex_digest: str) -> str:
    """A strong ETag from a content hash: stable across restarts and replicas."""
    return f'"{hex_digest[:32]}"'


def stat_etag(size: int, mtime_ns: int) -> str:
    """A strong ETag for a file whose content is only known by its metadata.

    Safe because published files are only ever replaced by rename, which
    changes the mtime; a rewrite in place is not something otad does.
    """
    return f'"{mtime_ns:x}-{size:x}"'


def _etag_list(header: str) -> list[str]:
    return [tag.strip() for tag in header.split(",") if tag.strip()]


def _weak_match(header: str, etag: str) -> bool:
    bare = etag.removeprefix("W/")
    return any(tag == "*" or tag.removeprefix("W/") == bare for tag in _etag_list(header))


def _not_modified_since(header: str, mtime: int) -> bool:
    try:
        since = parsedate_to_datetime(header)
    except (TypeError, ValueError, IndexError):
        return False
    return since is not None and mtime <= since.timestamp()


def _if_range_holds(header: str, file: Validators) -> bool:
    header = header.strip()
    if header.startswith('"') or header.startswith("W/"):
        return header == file.etag  # strong comparison; weak tags never match
    try:
        date = parsedate_to_datetime(header)
    except (TypeError, ValueError, IndexError):
        return False
    return date is not None and int(date.timestamp()) == file.mtime


def parse_range(header: str, size: int) -> tuple[int, int] | None | str:
    """(start, length) for one satisfiable range; None to ignore; 'unsatisfiable' for 416."""
    if len(header) > MAX_VALIDATOR_LEN:
        return None
    match = _RANGE.fullmatch(header.strip().replace(" ", ""))
    if match is None:
        return None  # several ranges or garbage: send the whole file
    first, last = match[1], match[2]
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:  # (fuzzing) the last N bytes of an empty file: none to send
            return "unsatisfiable"
        start = max(0, size - suffix)
        return start, size - start
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None  # invalid: ignore the Range header
    if start >= size:
        return "unsatisfiable"
    end = min(end, size - 1)
    return start, end - start + 1


def plan_response(method: str, headers, file: Validators) -> Plan:
    """`headers` is anything with .get(name) -> str | None (case-insensitive names)."""
    common = [("ETag", file.etag), ("Last-Modified", file.last_modified), ("Accept-Ranges", "bytes")]
    if_none_match = (headers.get("If-None-Match") or "")[:MAX_VALIDATOR_LEN]
    if if_none_match:
        if _weak_match(if_none_match, file.etag):
            return Plan(304, headers=common)
    elif _not_modified_since((headers.get("If-Modified-Since") or "")[:MAX_VALIDATOR_LEN], file.mtime):
        return Plan(304, headers=common)
    range_header = headers.get("Range")
    if method == "GET" and range_header:
        if_range = headers.get("If-Range")
        if not if_range or _if_range_holds(if_range[:MAX_VALIDATOR_LEN], file):
            span = parse_range(range_header, file.size)
            if span == "unsatisfiable":
                return Plan(416, headers=[*common, ("Content-Range", f"bytes */{file.size}")])
            if span is not None:
                start, length = span
                content_range = f"bytes {start}-{start + length - 1}/{file.size}"
                return Plan(206, start, length, [*common, ("Content-Range", content_range), ("Content-Length", str(length))])
    return Plan(200, 0, file.size, [*common, ("Content-Length", str(file.size))])
