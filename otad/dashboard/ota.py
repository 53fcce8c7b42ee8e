"""The OTA folder as the dashboard serves it: the current manifest, in memory, kept fresh.

`otad-release publish` copies the artifacts first and renames manifest.json in
last, so a new manifest appearing is the one event that matters. It is noticed
by an inotify watch on the folder (pyinotify) or, where inotify is unavailable,
by comparing manifest.json's (inode, mtime, size) on each request that needs
the manifest. Either way a new manifest is parsed with the one manifest reader
before it replaces the current one: a malformed file is logged and ignored.

manifest.json.bundle (its signature) is read together with it and served as
one pair from memory. Which two files form the pair is otad.manifest_pair's
answer: publish stages the new pair and renames it in, and a publish cut after
its commit point leaves the staged manifest with the new bundle, served as the
pair (it is what the next publish finishes). A bundle that names another
manifest's digest (files changed by hand) is not paired with it.
The dashboard holds no keys; gateways verify the pair.

Each published version's own pair, `releases/<version>/` (otad.manifest_pair.release_folder),
is read from disk when asked for (`release`): gateways fetch one only when a rollout plan
assigns a version they do not hold, so it is rare and need not be watched.
"""
from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from otad.errors import ConfigError, MalformedMetadata
from otad.fsutil import make_dirs
from otad.transfer.http import Validators, content_etag
from otad.semver import same_version
from otad.trust.bundle import MAX_BUNDLE_BYTES
from otad.trust.digest import digest_file
from otad.trust.manifest import MAX_MANIFEST_BYTES, Manifest, parse_checksum_file, parse_manifest
from otad.trust.metadata import MANIFEST, MANIFEST_BUNDLE, bundle_names_manifest
from otad.manifest_pair import BUNDLE_NEXT, MANIFEST_NEXT, RELEASES_DIR, pair_names, release_folder

log = logging.getLogger("otad.dashboard")

try:
    with warnings.catch_warnings():
        # pyinotify 0.9.6 imports asyncore, deprecated since Python 3.10.
        warnings.simplefilter("ignore", DeprecationWarning)
        import pyinotify
    # pyinotify installs its own timestamped stderr handler; our one-line format
    # (otad.log, or the host WSGI server's setup) should apply instead.
    logging.getLogger("pyinotify").handlers.clear()
    _INOTIFY_IMPORT_ERROR = ""
except Exception as exc:  # ImportError, or no inotify on this platform
    pyinotify = None
    _INOTIFY_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

StatKey = tuple[tuple[int, int, int] | None, ...]
PAIR_FILES = (MANIFEST, MANIFEST_BUNDLE, MANIFEST_NEXT, BUNDLE_NEXT)


@dataclass(frozen=True)
class Published:
    """The manifest being served: its exact bytes, their validators, what they say."""

    data: bytes
    validators: Validators
    manifest: Manifest
    bundle: bytes | None = None  # manifest.json.bundle; None: the manifest is unsigned
    bundle_validators: Validators | None = None

    @property
    def label(self) -> str:
        return f"{self.manifest.name} {self.manifest.version}"


class OtaFolder:
    """One OTA_DIR: `current()` is what /manifest serves; files are served from `root`."""

    def __init__(self, root: Path, use_inotify: bool = True) -> None:
        self.root = root
        _ensure_folder(root)
        self._lock = threading.Lock()
        self._current: Published | None = None
        self._seen: StatKey | None = None
        # Watch before the first read, so a publish in between is not missed.
        self._watcher = self._start_watcher() if use_inotify else None
        how = "inotify" if self._watcher else "a stat check per request"
        log.info("watching %s for new releases (%s)", root, how)
        with self._lock:
            self._load()

    def current(self) -> Published | None:
        """The manifest to serve now (None before the first publish)."""
        if not self._watching():
            self.refresh()
        return self._current

    def refresh(self, force: bool = False) -> None:
        """Re-read manifest.json if it changed since last seen (always, if forced)."""
        if not force and self._stat_key() == self._seen:
            return
        with self._lock:
            self._load()

    def unpublished(self, version: str) -> str | None:
        """Why `version` is not a release gateways can fetch from this folder, or None if it is:
        the current manifest's version, or a version with its kept pair in releases/<version>/
        (written by every publish, never removed by one) whose artifact, signature and checksum
        file are here and agree. The dashboard holds no release key: gateways and robots verify
        the signatures."""
        current = self.current()
        if current is not None and same_version(current.manifest.version, version):
            return None
        kept = self.release(version)
        if kept is None:
            return (f"{RELEASES_DIR}/{version}/{MANIFEST} is not in {self.root}, so gateways cannot fetch it "
                    f"(publish it with otad-release publish)")
        manifest = kept.manifest
        artifact, checksum = self.root / manifest.artifact, self.root / manifest.checksum
        if not (self.root / manifest.bundle).is_file():
            return f"{artifact.name} and its signature are not in {self.root} (publish it with otad-release publish)"
        try:
            digest_hex, named = parse_checksum_file(checksum.read_bytes()[:4096])
            if named != artifact.name or digest_file(artifact).hex != digest_hex or digest_hex != manifest.sha256:
                return f"{artifact.name} does not match {checksum.name} and its manifest"
        except OSError as exc:
            return f"{Path(exc.filename or checksum).name}: {exc.strerror or exc}"
        except MalformedMetadata as exc:
            return f"{checksum.name}: {exc}"
        return None

    def release(self, version: str) -> Published | None:
        """The manifest pair kept for `version` (releases/<version>/), read from disk now; None if
        there is none, or it is unreadable or inconsistent (logged)."""
        try:
            folder = release_folder(self.root, version)
        except MalformedMetadata:
            return None
        try:
            data, st, bundle, bundle_st = _read_pair(folder)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("cannot read %s (%s)", folder / MANIFEST, exc.strerror or exc)
            return None
        try:
            manifest = parse_manifest(data)
            if manifest.version != version:
                raise MalformedMetadata(f"it holds the manifest of {manifest.version}")
        except MalformedMetadata as exc:
            log.error("ignoring %s: %s", folder / MANIFEST, exc)
            return None
        if bundle is not None and bundle_names_manifest(data, bundle) is False:
            log.warning("%s names another manifest than %s (changed by hand?)", folder / MANIFEST_BUNDLE, MANIFEST)
            return None
        return _published(data, st, manifest, bundle, bundle_st)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()

    def _watching(self) -> bool:
        return self._watcher is not None and self._watcher.alive

    def _start_watcher(self) -> _Watcher | None:
        if pyinotify is None:
            log.warning("pyinotify is unavailable (%s); checking %s by stat", _INOTIFY_IMPORT_ERROR, MANIFEST)
            return None
        try:
            return _Watcher(self.root, lambda: self.refresh(force=True))
        except OSError as exc:
            log.warning("cannot watch %s with inotify (%s); checking %s by stat", self.root, exc, MANIFEST)
            return None

    def _stat_key(self) -> StatKey:
        return tuple(_stat_key(self.root / name) for name in PAIR_FILES)

    def _load(self) -> None:
        """Read manifest.json and its bundle and switch to them if valid. Caller holds the lock."""
        path = self.root / MANIFEST
        seen = self._stat_key()
        try:
            data, st, bundle, bundle_st = _read_pair(self.root)
        except FileNotFoundError:
            self._seen = seen
            if self._current is not None:
                log.warning("%s was removed; no release is served until the next publish", path)
            self._current = None
            return
        except OSError as exc:
            # Remember the key anyway: the stat fallback must not log this on every request.
            self._seen = seen
            log.error("cannot read %s (%s); %s", path, exc.strerror or exc, self._still_serving())
            return
        self._seen = seen
        if self._current is not None and data == self._current.data and bundle == self._current.bundle:
            return
        try:
            manifest = parse_manifest(data)
        except MalformedMetadata as exc:
            log.error("ignoring malformed %s: %s; %s", path, exc, self._still_serving())
            return
        if bundle is not None and bundle_names_manifest(data, bundle) is False:
            log.warning("%s names another manifest than %s (changed by hand?); %s", MANIFEST_BUNDLE, MANIFEST, self._still_serving())
            return
        if bundle is None:
            log.warning("%s has no %s: gateways will refuse the unsigned manifest", path, MANIFEST_BUNDLE)
        self._current = _published(data, st, manifest, bundle, bundle_st)
        log.info("serving %s %s (manifest ETag %s)", manifest.name, manifest.version, self._current.validators.etag)

    def _still_serving(self) -> str:
        return f"still serving {self._current.label}" if self._current else "no release is served yet"


class _Watcher:
    """An inotify watch on the folder, calling `on_change` from its own thread."""

    def __init__(self, root: Path, on_change: Callable[[], None]) -> None:
        self.alive = True
        self._root = root
        self._on_change = on_change
        self._manager = pyinotify.WatchManager()
        mask = pyinotify.IN_MOVED_TO | pyinotify.IN_CLOSE_WRITE | pyinotify.IN_DELETE | pyinotify.IN_MOVED_FROM
        watches = self._manager.add_watch(str(root), mask)
        if watches.get(str(root), -1) < 0:
            self._manager.close()
            raise OSError("inotify_add_watch failed")
        self._notifier = pyinotify.ThreadedNotifier(self._manager, self._handle)
        self._notifier.name = "ota-inotify"
        self._notifier.daemon = True
        self._notifier.start()

    def _handle(self, event) -> None:
        try:
            if event.mask & pyinotify.IN_IGNORED:
                # The folder itself went away (deleted, unmounted): no more events will come.
                self.alive = False
                log.warning("inotify watch on %s ended; checking %s by stat from now on", self._root, MANIFEST)
            elif event.mask & pyinotify.IN_Q_OVERFLOW or event.name in PAIR_FILES:
                self._on_change()
        except Exception as exc:  # the watcher thread must survive anything
            log.error("handling an inotify event failed: %s: %s", type(exc).__name__, exc)

    def stop(self) -> None:
        self.alive = False
        self._notifier.stop()


def _ensure_folder(root: Path) -> None:
    """Create OTA_DIR if missing: the dashboard answers 404s before the first publish."""
    try:
        make_dirs(root)
    except OSError as exc:
        raise ConfigError(f"OTA_DIR ({root}): cannot create folder ({exc.strerror})") from None
    if not root.is_dir():
        raise ConfigError(f"OTA_DIR ({root}): not a folder")


def _stat_key(path: Path) -> StatKey | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _published(data: bytes, st: os.stat_result, manifest: Manifest, bundle: bytes | None,
               bundle_st: os.stat_result | None) -> Published:
    etag = content_etag(hashlib.sha256(data).hexdigest())
    bundle_validators = None
    if bundle is not None:
        bundle_validators = Validators(len(bundle), content_etag(hashlib.sha256(bundle).hexdigest()), int(bundle_st.st_mtime))
    return Published(data, Validators(len(data), etag, int(st.st_mtime)), manifest, bundle, bundle_validators)


def _read_pair(folder: Path) -> tuple[bytes, os.stat_result, bytes | None, os.stat_result | None]:
    """A folder's manifest and its bundle (None if missing); FileNotFoundError when there is no manifest."""
    for attempt in range(3):
        manifest_name, bundle_name = pair_names(folder)
        try:
            data, st = _read_manifest(folder / manifest_name, MAX_MANIFEST_BYTES)
            try:
                bundle, bundle_st = _read_manifest(folder / bundle_name, MAX_BUNDLE_BYTES)
            except FileNotFoundError:
                if bundle_name != MANIFEST_BUNDLE:
                    raise
                bundle, bundle_st = None, None
            except OSError:
                bundle, bundle_st = None, None
            return data, st, bundle, bundle_st
        except FileNotFoundError:
            if manifest_name == MANIFEST and bundle_name == MANIFEST_BUNDLE:
                raise
            # A staged file was renamed in while we read: the pair is complete now, look again.
    raise FileNotFoundError(folder / MANIFEST)


def _read_manifest(path: Path, limit: int) -> tuple[bytes, os.stat_result]:
    # O_NONBLOCK: a FIFO dropped in under this name must not hang the dashboard.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as stream:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file")
        return stream.read(limit + 1), st
