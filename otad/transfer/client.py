"""The one HTTP client for release files: small bounded fetches and resumable downloads.

Used by the gateway (from the dashboard) and the robot (from its gateway).
Downloads go to `<name>.part` with a `<name>.part.meta` sidecar holding the
server's ETag; a resume sends `Range` + `If-Range`, so a changed file on the
server restarts cleanly from zero instead of splicing two versions (the
truncated part is on disk before `.meta` names the new ETag, so no kill or
power cut between the two writes can pair old bytes with a new ETag). A part
found already complete is kept only if its last byte still answers 206 under
`If-Range` (a refused part whose deletion a power cut undid must not stand in
for the file the server has now). The file is hashed while it arrives. Network failures raise
`TransportError` (the part is kept); a server sending more bytes than the
signed manifest promised raises `ChecksumMismatch` (the part is deleted).

Every request, small or large, runs under a minimum-progress watchdog
(transfer/watchdog.py): headers and body must keep arriving at MIN_RATE, or
the transfer is cut ("too slow") and resumed at a later poll (slow retrieval).
Small fetches are capped (manifest 64 KiB, bundle 256 KiB, checksum 4 KiB),
downloads at the signed manifest's size (endless data).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import TypeVar
from dataclasses import dataclass
from pathlib import Path

import requests

from otad import __version__
from otad.errors import ChecksumMismatch, MalformedMetadata, TransportError, TrustError
from otad.fsutil import atomic_write_bytes
from otad.semver import Version
from otad.transfer.tls import ClientTls, describe_tls_error
from otad.transfer.watchdog import Progress, WatchedAdapter, socket_progress_available
from otad.trust.bundle import MAX_BUNDLE_BYTES
from otad.trust.digest import CHUNK, FileDigest
from otad.trust.manifest import MAX_MANIFEST_BYTES
from otad.trust.metadata import UnsignedManifest

T = TypeVar("T")
MANIFEST_PATH = "/manifest"
MANIFEST_BUNDLE_PATH = "/manifest.bundle"


def release_paths(version: str) -> tuple[str, str]:
    """The dashboard's kept pair of one published version (docs/formats.md); `version` checked first."""
    text = Version(version).text
    return f"/releases/{text}/manifest", f"/releases/{text}/manifest.bundle"


DOWNLOAD_CHUNK = 256 * 1024
MIN_CHUNK = 4096
SOCKET_COUNTED_CHUNK = 64 * 1024


@dataclass(frozen=True)
class TransferLimits:
    """Timeouts in seconds. A transfer that delivers no byte for `read_timeout`, or
    fewer than 3/4 of `min_rate` bytes/s over any `read_timeout` window (headers
    included), is cut and resumed later. `min_rate=0` keeps only the read timeout."""

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    min_rate: int = 4096

    @property
    def window_bytes(self) -> int:
        return int(self.min_rate * self.read_timeout * 3 / 4)

    @property
    def chunk(self) -> int:
        if socket_progress_available():
            # The watchdog counts at the socket, so chunks need not be small; a cut loses at
            # most the chunk in flight, and 64 KiB costs little more CPU than 256 KiB.
            return SOCKET_COUNTED_CHUNK
        # Counted per chunk read: several chunks must fit in one window at min_rate.
        return max(MIN_CHUNK, min(DOWNLOAD_CHUNK, int(self.min_rate * self.read_timeout / 8))) if self.min_rate else DOWNLOAD_CHUNK


class HttpStatusError(TransportError):
    """The server answered with an unexpected HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Fetched:
    status: int  # 200 or 304
    body: bytes = b""
    etag: str | None = None


def _transport_error(url: str, exc: Exception, method: str = "GET") -> TransportError:
    detail = describe_tls_error(exc) if isinstance(exc, requests.exceptions.SSLError) else ""
    return TransportError(f"{method} {url}: {type(exc).__name__}" + (f" ({detail})" if detail else ""))


def _failure(url: str, exc: Exception, watch: Progress) -> TransportError:
    if watch.tripped:
        return TransportError(f"GET {url}: {watch.tripped}")
    return _transport_error(url, exc)


class HttpClient:
    def __init__(self, base_url: str, limits: TransferLimits | None = None, headers: dict[str, str] | None = None,
                 tls: ClientTls | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.limits = limits or TransferLimits()
        self.session = requests.Session()
        self.session.headers.update({"User-Agent": f"otad/{__version__}", **(headers or {})})
        for prefix in ("http://", "https://"):
            self.session.mount(prefix, WatchedAdapter())
        # Per request, not on the session: requests lets $REQUESTS_CA_BUNDLE override a session's
        # `verify`, and the configured CA must win. The server certificate is always checked.
        self.tls_options = (tls or ClientTls()).session_options()

    def close(self) -> None:
        self.session.close()

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def _watch(self, url: str) -> Progress:
        return Progress(self.limits.read_timeout, self.limits.window_bytes if self.limits.min_rate else 0, url)

    def _get(self, url: str, headers: dict[str, str], watch: Progress) -> requests.Response:
        try:
            return self.session.get(
                url, headers=headers, stream=True, allow_redirects=False,
                timeout=(self.limits.connect_timeout, self.limits.read_timeout), **self.tls_options,
            )
        except requests.RequestException as exc:
            raise _failure(url, exc, watch) from None

    def get_small(self, path: str, max_bytes: int, etag: str | None = None) -> Fetched:
        """GET a small document (manifest, bundle, checksum) of at most max_bytes."""
        url = self.url(path)
        with self._watch(url) as watch:
            response = self._get(url, {"If-None-Match": etag} if etag else {}, watch)
            with response:
                if response.status_code == 304:
                    return Fetched(304, etag=etag)
                if response.status_code != 200:
                    raise HttpStatusError(f"GET {url}: HTTP {response.status_code}", response.status_code)
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise MalformedMetadata(f"{path} is larger than {max_bytes} bytes (Content-Length {declared[:20]})")
                body = bytearray()
                try:
                    for chunk in response.iter_content(CHUNK):
                        body += chunk
                        watch.add(len(chunk))
                        if len(body) > max_bytes:
                            raise MalformedMetadata(f"{path} is larger than {max_bytes} bytes")
                except requests.RequestException as exc:
                    raise _failure(url, exc, watch) from None
                if watch.tripped or (declared.isdigit() and len(body) != int(declared)):
                    # urllib3 1.26 ends a cut body quietly: never take a truncated document for a whole one.
                    raise TransportError(f"GET {url}: {watch.tripped or f'body ended at {len(body)} of {declared} bytes'}")
                return Fetched(200, bytes(body), response.headers.get("ETag"))

    def get_manifest_bundle(self, path: str = MANIFEST_BUNDLE_PATH) -> bytes:
        try:
            return self.get_small(path, MAX_BUNDLE_BYTES).body
        except HttpStatusError as exc:
            if exc.status == 404:
                raise UnsignedManifest(f"manifest is not signed: {exc}") from None
            raise

    def verified_manifest(self, manifest: bytes, verify: Callable[[bytes, bytes], T],
                          paths: tuple[str, str] = (MANIFEST_PATH, MANIFEST_BUNDLE_PATH)) -> tuple[T, bytes, bytes]:
        """Fetch the bundle of `manifest` and return (verify(manifest, bundle), manifest, bundle).

        /manifest and /manifest.bundle (or another pair's two `paths`, e.g. release_paths)
        are two requests, and a publish (or a gateway installing a release) can land between
        them: if the pair does not verify, both are fetched again once and the new pair is verified.
        """
        manifest_path, bundle_path = paths
        bundle = self.get_manifest_bundle(bundle_path)
        try:
            return verify(manifest, bundle), manifest, bundle
        except TrustError:
            again = self.get_small(manifest_path, MAX_MANIFEST_BYTES).body
            bundle_again = self.get_manifest_bundle(bundle_path)
            if again == manifest and bundle_again == bundle:
                raise
        return verify(again, bundle_again), again, bundle_again

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, object]:
        """POST a body; return (status, parsed JSON reply or None). Network trouble: TransportError."""
        url = self.url(path)
        try:
            response = self.session.post(
                url, data=body, headers=headers, allow_redirects=False,
                timeout=(self.limits.connect_timeout, self.limits.read_timeout), **self.tls_options,
            )
        except requests.RequestException as exc:
            raise _transport_error(url, exc, "POST") from None
        with response:
            try:
                reply = response.json() if response.content else None
            except ValueError:
                reply = None
            return response.status_code, reply

    def post_json(self, path: str, doc: object, max_reply: int) -> tuple[int, bytes]:
        """POST `doc` as JSON; return (status, the reply's bytes, at most `max_reply`). A longer reply
        is MalformedMetadata (a small API's answer, never a stream); network trouble: TransportError."""
        url = self.url(path)
        body = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
        with self._watch(url) as watch:
            try:
                response = self.session.post(
                    url, data=body, headers={"Content-Type": "application/json"}, stream=True, allow_redirects=False,
                    timeout=(self.limits.connect_timeout, self.limits.read_timeout), **self.tls_options,
                )
            except requests.RequestException as exc:
                raise _transport_error(url, exc, "POST") from None
            with response:
                reply = bytearray()
                try:
                    for chunk in response.iter_content(CHUNK):
                        reply += chunk
                        watch.add(len(chunk))
                        if len(reply) > max_reply:
                            raise MalformedMetadata(f"POST {path}: the answer is larger than {max_reply} bytes")
                except requests.RequestException as exc:
                    raise _transport_error(url, exc, "POST") from None
                if watch.tripped:
                    raise TransportError(f"POST {url}: {watch.tripped}")
                return response.status_code, bytes(reply)

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
        with self._watch(url) as watch:
            if have == expected_size and have:
                # Finished before a crash or power cut, then maybe refused (a deletion a cut can undo):
                # kept only while the server still has that very file, else fetched whole again.
                if self._unchanged(url, have, etag, watch):
                    return FileDigest(size=have, sha256=hasher.digest())
                _discard(part, meta_path)
                have, hasher = 0, hashlib.sha256()
            headers = {"Range": f"bytes={have}-", "If-Range": etag} if have else {}
            have, hasher = self._fetch_into(url, part, meta_path, headers, have, etag, expected_size, hasher, progress, watch)
        if have < expected_size:
            reason = watch.tripped or f"connection ended at {have} of {expected_size} bytes"
            raise TransportError(f"GET {url}: {reason}")
        return FileDigest(size=have, sha256=hasher.digest())

    def _unchanged(self, url: str, size: int, etag: str, watch: Progress) -> bool:
        """True if the server's file is still the one with `etag`: its last byte answers 206 under If-Range."""
        response = self._get(url, {"Range": f"bytes={size - 1}-", "If-Range": etag}, watch)
        with response:
            if response.status_code == 206:
                return _resumes_at(response, size - 1, etag)
            if response.status_code in (200, 416):
                return False
            raise HttpStatusError(f"GET {url}: HTTP {response.status_code}", response.status_code)

    def _fetch_into(self, url, part, meta_path, headers, have, etag, expected_size, hasher, progress, watch):
        """One GET into `part`; returns (bytes now in part, the hasher over them)."""
        response = self._get(url, headers, watch)
        with response:
            if response.status_code == 206 and have and _resumes_at(response, have, etag):
                mode = "ab"
            elif response.status_code == 200:
                have, hasher, mode = 0, hashlib.sha256(), "wb"
            elif response.status_code in (206, 416):
                _discard(part, meta_path)  # our part no longer fits the server's file
                raise TransportError(f"GET {url}: cannot resume (HTTP {response.status_code}); restarting")
            else:
                raise HttpStatusError(f"GET {url}: HTTP {response.status_code}", response.status_code)
            with open(part, mode) as out:
                if mode == "wb":
                    # Restarting from zero: the truncation must be on disk before .meta names the
                    # new ETag, or a kill between the two would leave the old bytes under the new
                    # ETag, and the next resume would splice the two files.
                    os.fsync(out.fileno())
                new_etag = response.headers.get("ETag")
                atomic_write_bytes(meta_path, json.dumps({"url": url, "size": expected_size, "etag": new_etag}).encode())
                return self._receive(response, url, part, out, have, expected_size, hasher, progress, watch), hasher

    def _receive(self, response, url, part: Path, out, have: int, expected: int, hasher, progress, watch: Progress) -> int:
        try:
            for chunk in response.iter_content(self.limits.chunk):
                watch.add(len(chunk))
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
            raise _failure(url, exc, watch) from None
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
