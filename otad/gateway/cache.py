"""The gateway's release cache: only verified releases, bounded, crash-safe.

Layout under CACHE_DIR:
    manifest.json          the manifest robots see (the dashboard's exact bytes); names the active version
                           (never a release fetched only because a rollout plan needs it)
    versions/<v>.json      each cached, verified version: {"manifest": b64, "manifest_bundle": b64},
                           the signed manifest and its bundle as one file, so they never disagree
    files/<name>           artifacts, bundles and checksum files of those versions
    partial/<name>.part    downloads in progress (+ .part.meta), never served

A version exists only once its `versions/<v>.json` exists, and that file is
written after the version's files are complete and fsynced; `manifest.json`
is replaced last. So after a crash at any instant the cache holds only
verified releases, plus orphans and parts that GC or the next download clean up.
Robots get the manifest and bundle of the active version's `versions/<v>.json`.
Readers (the edge server's threads) take `snapshot`, an immutable view that is
swapped whole, so they never see a half-updated cache.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from otad.errors import MalformedMetadata, OtadError
from otad.fsutil import atomic_write_bytes, fsync_dir, make_dirs
from otad.semver import Version
from otad.transfer.http import Validators, content_etag
from otad.trust.digest import FileDigest
from otad.trust.manifest import Manifest, parse_manifest
from otad.trust.metadata import verify_manifest
from otad.trust.verify import TrustAnchors, verify_artifact

log = logging.getLogger("otad.gateway")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ServedFile:
    path: Path
    validators: Validators


@dataclass(frozen=True)
class CachedRelease:
    manifest: Manifest
    manifest_bytes: bytes
    manifest_bundle: bytes
    files: dict[str, ServedFile]

    @property
    def size(self) -> int:
        return sum(f.validators.size for f in self.files.values())


@dataclass(frozen=True)
class Snapshot:
    releases: dict[str, CachedRelease] = field(default_factory=dict)
    active: CachedRelease | None = None
    manifest_validators: Validators | None = None
    files: dict[str, ServedFile] = field(default_factory=dict)
    bundle_validators: Validators | None = None

    @property
    def size(self) -> int:
        return sum(r.size for r in self.releases.values())


def _validators(path: Path, etag_hex: str) -> Validators:
    st = path.stat()
    return Validators(size=st.st_size, etag=content_etag(etag_hex), mtime=int(st.st_mtime))


class Cache:
    def __init__(self, root: Path, anchors: TrustAnchors) -> None:
        self.root = root
        self.anchors = anchors
        self.files_dir = root / "files"
        self.versions_dir = root / "versions"
        self.partial_dir = root / "partial"
        self._lock = threading.Lock()
        self.snapshot = Snapshot()

    # -- start-up ---------------------------------------------------------------
    def load(self) -> None:
        for directory in (self.root, self.files_dir, self.versions_dir, self.partial_dir):
            make_dirs(directory)
        releases: dict[str, CachedRelease] = {}
        for entry in sorted(self.versions_dir.glob("*.json")):
            release = self._load_release(entry)
            if release is not None:
                releases[release.manifest.version] = release
        active = None
        try:
            # Only the version counts: a crash between re-writing versions/<v>.json (a
            # re-signed manifest of the same version) and manifest.json leaves them differing.
            active = releases.get(parse_manifest((self.root / MANIFEST).read_bytes()).version)
        except (OSError, OtadError):
            pass
        self._publish(releases, active)

    def _load_release(self, entry: Path) -> CachedRelease | None:
        try:
            data, manifest_bundle = _read_envelope(entry)
            # Signature only, not expiry: what was verified fresh keeps being served (robots
            # apply their own expiry and grace); a removed key stops it being served.
            manifest = verify_manifest(data, manifest_bundle, self.anchors, now=None).manifest
            if manifest.version != entry.stem:
                raise MalformedMetadata(f"holds the manifest of {manifest.version}")
            artifact = self.files_dir / manifest.artifact
            bundle = (self.files_dir / manifest.bundle).read_bytes()
            checksum = (self.files_dir / manifest.checksum).read_bytes()
            # Verified at install; re-check what is cheap (size, checksum file,
            # signature over the recorded digest) so a key removed from
            # TRUSTED_KEYS also stops its releases from being served.
            observed = FileDigest(size=artifact.stat().st_size, sha256=bytes.fromhex(manifest.sha256))
            verify_artifact(artifact, manifest, bundle, self.anchors, checksum_bytes=checksum, observed=observed)
        except (OSError, OtadError) as exc:
            log.warning("dropping cached release %s: %s", entry.stem, exc)
            _unlink(entry)
            return None
        return self._describe(manifest, data, manifest_bundle, bundle, checksum)

    def _describe(self, manifest: Manifest, manifest_bytes: bytes, manifest_bundle: bytes, bundle: bytes, checksum: bytes) -> CachedRelease:
        files = {
            manifest.artifact: ServedFile(self.files_dir / manifest.artifact, _validators(self.files_dir / manifest.artifact, manifest.sha256)),
            manifest.bundle: ServedFile(self.files_dir / manifest.bundle, _validators(self.files_dir / manifest.bundle, hashlib.sha256(bundle).hexdigest())),
            manifest.checksum: ServedFile(self.files_dir / manifest.checksum, _validators(self.files_dir / manifest.checksum, hashlib.sha256(checksum).hexdigest())),
        }
        return CachedRelease(manifest, manifest_bytes, manifest_bundle, files)

    def _publish(self, releases: dict[str, CachedRelease], active: CachedRelease | None) -> None:
        files = {name: f for release in releases.values() for name, f in release.files.items()}
        validators = bundle_validators = None
        if active is not None:
            mtime = int((self.root / MANIFEST).stat().st_mtime)
            validators = Validators(len(active.manifest_bytes), content_etag(hashlib.sha256(active.manifest_bytes).hexdigest()), mtime)
            bundle_validators = Validators(len(active.manifest_bundle), content_etag(hashlib.sha256(active.manifest_bundle).hexdigest()), mtime)
        self.snapshot = Snapshot(releases, active, validators, files, bundle_validators)

    # -- install ----------------------------------------------------------------
    def partial_path(self, name: str) -> Path:
        return self.partial_dir / f"{name}.part"

    def cached_artifact(self, manifest: Manifest) -> Path | None:
        """The artifact already in files/ for this exact digest (same version re-published)."""
        for release in self.snapshot.releases.values():
            if release.manifest.artifact == manifest.artifact and release.manifest.sha256 == manifest.sha256:
                return self.files_dir / manifest.artifact
        return None

    def install(self, manifest: Manifest, manifest_bytes: bytes, manifest_bundle: bytes, artifact: Path,
                bundle: bytes, checksum: bytes, activate: bool = True) -> CachedRelease:
        """Move a verified release in; the robots' manifest.json changes last.

        `activate=False`: a release a rollout plan needs (gateway/planned.py) is kept beside
        the active one, served only to robots a plan assigns it; manifest.json stays."""
        with self._lock:
            atomic_write_bytes(self.files_dir / manifest.bundle, bundle)
            atomic_write_bytes(self.files_dir / manifest.checksum, checksum)
            target = self.files_dir / manifest.artifact
            if artifact != target:
                os.replace(artifact, target)
                _unlink(artifact.with_name(artifact.name + ".meta"))
                fsync_dir(self.files_dir)
            atomic_write_bytes(self.versions_dir / f"{manifest.version}.json", _envelope(manifest_bytes, manifest_bundle))
            if activate:
                atomic_write_bytes(self.root / MANIFEST, manifest_bytes)
            release = self._describe(manifest, manifest_bytes, manifest_bundle, bundle, checksum)
            releases = {**self.snapshot.releases, manifest.version: release}
            self._publish(releases, release if activate else self.snapshot.active)
            return release

    # -- bounds -------------------------------------------------------------------
    def room_for(self, size: int, max_bytes: int) -> str | None:
        """None if a download of `size` bytes fits beside the active release, else why not."""
        active = self.snapshot.active
        active_size = active.size if active is not None else 0
        if active_size + size > max_bytes:
            held = f" beside the active {active.manifest.version} ({_mib(active_size)})" if active else ""
            return f"{_mib(size)} does not fit in CACHE_MAX_MB={max_bytes // 2**20}{held}"
        return None

    def gc(self, keep_versions: int, max_bytes: int, reserve: int = 0, keep_parts: frozenset[str] = frozenset(),
           protect: frozenset[str] = frozenset()) -> list[str]:
        """Evict the oldest inactive versions beyond the bounds; remove orphans and stale parts.

        `protect`: versions a current rollout plan assigns (its target, the versions it moves
        from): never evicted, whatever the bounds, so robots can always be given them."""
        with self._lock:
            snapshot = self.snapshot
            releases = dict(snapshot.releases)
            active = snapshot.active.manifest.version if snapshot.active else None
            evictable = sorted((v for v in releases if v != active and v not in protect), key=Version)
            evicted = []
            while evictable and (len(releases) > keep_versions or sum(r.size for r in releases.values()) + reserve > max_bytes):
                version = evictable.pop(0)
                releases.pop(version)
                evicted.append(version)
            if evicted:
                # Stop serving first, then delete: a robot mid-download keeps its open file.
                self._publish(releases, snapshot.active)
                for version in evicted:
                    _unlink(self.versions_dir / f"{version}.json")
                    log.info("cache gc: evicted app %s", version)
            self._remove_orphans(releases, keep_parts)
            return evicted

    def _remove_orphans(self, releases: dict[str, CachedRelease], keep_parts: frozenset[str]) -> None:
        wanted = {name for r in releases.values() for name in r.files}
        for path in self.files_dir.iterdir():
            if path.name not in wanted:
                _unlink(path)
        for path in self.partial_dir.iterdir():
            if path.name.removesuffix(".meta") not in keep_parts:
                _unlink(path)
        for path in self.versions_dir.iterdir():
            if path.suffix != ".json" or path.stem not in releases:
                _unlink(path)


def _mib(size: int) -> str:
    # One decimal, rounded up: a release that does not fit never reads as "0 MiB".
    tenths = -(-size * 10 // 2**20)
    return f"{tenths // 10}.{tenths % 10} MiB"


def _envelope(manifest_bytes: bytes, manifest_bundle: bytes) -> bytes:
    doc = {"manifest": base64.b64encode(manifest_bytes).decode(), "manifest_bundle": base64.b64encode(manifest_bundle).decode()}
    return json.dumps(doc).encode()


def _read_envelope(path: Path) -> tuple[bytes, bytes]:
    try:
        doc = json.loads(path.read_bytes())
        return base64.b64decode(doc["manifest"], validate=True), base64.b64decode(doc["manifest_bundle"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise MalformedMetadata("not a signed manifest record (written by an older otad?)") from None


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        pass
