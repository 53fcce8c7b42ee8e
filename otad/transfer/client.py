"""The one HTTP client for release files: small bounded fetches and resumable downloads.

Used by the gateway (from the dashboard) and the robot (from its gateway).
Downloads go to `<name>.part` with a `<name>.part.meta` sidecar holding the
server's ETag; a resume sends `Range` + `If-Range`, so a changed file on the
server restarts cleanly from zero instead of splicing two versions. The file
is hashed while it arrives; nothing is read twice. Network failures raise
`TransportError` (the part is kept); a server sending more bytes than the
signed manifest promised raises `ChecksumMismatch` (the part is deleted).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests

from otad import __version__
from otad.errors import ChecksumMismatch, MalformedMetadata, TransportError
from otad.fsutil import atomic_write_bytes
from otad.trust.digest import CHUNK, FileDigest

DOWNLOAD_CHUNK = 256 * 1024


@dataclass(frozen=True)
class TransferLimits:
    """Timeouts in seconds. `read_timeout` is also the minimum-progress rule:
    a transfer that delivers no byte for that long is cut and resumed later."""

    connect_timeout: float = 10.0
    read_timeout: float = 30.0


@dataclass(frozen=True)
class Fetched:
    status: int  # 200 or 304
    body: bytes = b""
    etag: str | None = None


def _transport_error(url: str, exc: Exception, method: str = "GET") -> TransportError:
    return TransportError(f"{method} {url}: {type(exc).__name__}")


class HttpClient:
    def __init__(self, base_url: str, limits: TransferLimits | None = None, headers: dict[str, str] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.limits = limits or TransferLimits()
        self.session = requests.Session()
        self.session.headers.update({"User-Agent": f"otad/{__version__}", **(headers or {})})

    def close(self) -> None:
        self.session.close()

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def _get(self, url: str, headers: dict[str, str]) -> requests.Response:
        try:
            return self.session.get(
                url, headers=headers, stream=True, allow_redirects=False,
                timeout=(self.limits.connect_timeout, self.limits.read_timeout),
            )
        except requests.RequestException as exc:
            raise _transport_error(url, exc) from None

    def get_small(self, path: str, max_bytes: int, etag: str | None = None) -> Fetched:
        """GET a small document (manifest, bundle, checksum) of at most max_bytes."""
        url = self.url(path)
        response = self._get(url, {"If-None-Match": etag} if etag else {})
        with response:
            if response.status_code == 304:
                return Fetched(304, etag=etag)
            if response.status_code != 200:
                raise TransportError(f"GET {url}: HTTP {response.status_code}")
            body = bytearray()
            try:
                for chunk in response.iter_content(CHUNK):
                    body += chunk
                    if len(body) > max_bytes:
                        raise MalformedMetadata(f"{path} is larger than {max_bytes} bytes")
            except requests.RequestException as exc:
                raise _transport_error(url, exc) from None
            return Fetched(200, bytes(body), response.headers.get("ETag"))

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, object]:
        """POST a body; return (status, parsed JSON reply or None). Network trouble: TransportError."""
        url = self.url(path)
        try:
            response = self.session.post(
                url, data=body, headers=headers, allow_redirects=False,
                timeout=(self.limits.connect_timeout, self.limits.read_timeout),
            )
        except requests.RequestException as exc:
            raise _transport_error(url, exc, "POST") from None
        with response:
            try:
                reply = response.json() if response.content else None
            except ValueError:
                reply = None
            return response.status_code, reply

    def download(
        self,
        path: str,
        part: Path,
        expected_size: int,
        progress: Callable[[int, int], None] | None = None,
    ) -> FileDigest:
        """Fetch `path` into `part`, resuming what is there; return the whole file's digest."""
        url = self.url(path)
        meta_path = part.with_name(part.name + ".meta")
        have, etag = _resumable(part, meta_path, url, expected_size)
        hasher = _hash_existing(part, have)
        if have == expected_size and have:
            return FileDigest(size=have, sha256=hasher.digest())  # finished before a crash
        headers = {"Range": f"bytes={have}-", "If-Range": etag} if have else {}
        response = self._get(url, headers)
        with response:
            if response.status_code == 206 and have and _resumes_at(response, have, etag):
                mode = "ab"
            elif response.status_code == 200:
                have, hasher, mode = 0, hashlib.sha256(), "wb"
            elif response.status_code in (206, 416):
                _discard(part, meta_path)  # our part no longer fits the server's file
                raise TransportError(f"GET {url}: cannot resume (HTTP {response.status_code}); restarting")
            else:
                raise TransportError(f"GET {url}: HTTP {response.status_code}")
            new_etag = response.headers.get("ETag")
            atomic_write_bytes(meta_path, json.dumps({"url": url, "size": expected_size, "etag": new_etag}).encode())
            have = self._receive(response, url, part, mode, have, expected_size, hasher, progress)
        if have < expected_size:
            raise TransportError(f"GET {url}: connection ended at {have} of {expected_size} bytes")
        return FileDigest(size=have, sha256=hasher.digest())

    def _receive(self, response, url, part: Path, mode: str, have: int, expected: int, hasher, progress) -> int:
        with open(part, mode) as out:
            try:
                for chunk in response.iter_content(DOWNLOAD_CHUNK):
                    if have + len(chunk) > expected:
                        out.close()
                        _discard(part, part.with_name(part.name + ".meta"))
                        raise ChecksumMismatch(f"{url} sent more than the manifest's {expected} bytes")
                    out.write(chunk)
                    hasher.update(chunk)
                    have += len(chunk)
                    if progress is not None:
                        progress(have, expected)
            except requests.RequestException as exc:
                raise _transport_error(url, exc) from None
            finally:
                if not out.closed:
                    out.flush()
                    os.fsync(out.fileno())
        return have


def _resumable(part: Path, meta_path: Path, url: str, expected_size: int) -> tuple[int, str]:
    """How many bytes of `part` can be kept, and the ETag they came with."""
    try:
        meta = json.loads(meta_path.read_bytes())
        have = part.stat().st_size
    except (OSError, ValueError):
        _discard(part, meta_path)
        return 0, ""
    if not isinstance(meta, dict) or meta.get("url") != url or meta.get("size") != expected_size or have > expected_size:
        _discard(part, meta_path)
        return 0, ""
    etag = meta.get("etag")
    if not (isinstance(etag, str) and etag.startswith('"')):
        # No strong validator: resuming could splice two different files.
        _discard(part, meta_path)
        return 0, ""
    return have, etag


def _resumes_at(response: requests.Response, have: int, etag: str) -> bool:
    content_range = response.headers.get("Content-Range", "")
    return content_range.startswith(f"bytes {have}-") and response.headers.get("ETag") == etag


def _hash_existing(part: Path, have: int):
    hasher = hashlib.sha256()
    if have:
        with open(part, "rb") as stream:
            remaining = have
            while remaining:
                chunk = stream.read(min(CHUNK, remaining))
                if not chunk:
                    break
                hasher.update(chunk)
                remaining -= len(chunk)
    return hasher


def _discard(*paths: Path) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
