"""Releases a current rollout plan needs that the gateway does not hold, fetched by version (issue 15).

The dashboard's /manifest names only the newest release. A plan may assign an older one
(its target, while a newer release is published) and its rollback returns robots to
the versions they came from (`Rollouts.needed_versions`). After each poll that reached
the dashboard, the sync worker hands the missing ones here: each is fetched from the
dashboard's kept pair (GET /releases/<version>/manifest and .bundle, docs/formats.md)
and goes through the same steps as the newest release (HttpClient.verified_manifest,
verify_manifest with expiry, then Syncer's download and verify_artifact and
check_archive_version), installed into the cache beside the active release, never as
it, and without touching the anti-rollback floor (docs/security.md).

A pair that fails is held back per version, as /manifest is (ManifestPoll): one log
line, then no new attempt until the dashboard serves other bytes for that version,
the hold ends, or SIGHUP. A version the dashboard does not have (404) is said once.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable

from otad.errors import MalformedMetadata, OtadError, TransportError, TrustError
from otad.semver import Version
from otad.transfer.backoff import ManifestPoll
from otad.transfer.client import HttpClient, HttpStatusError, release_paths
from otad.trust.manifest import MAX_MANIFEST_BYTES
from otad.trust.metadata import SignedManifest

log = logging.getLogger("otad.gateway")
Verify = Callable[[bytes, bytes], SignedManifest]
Install = Callable[[SignedManifest, bytes, bytes], None]


class PlannedReleases:
    """Used by the sync worker's thread only; `reset` also from the main loop (SIGHUP)."""

    def __init__(self) -> None:
        self._polls: dict[str, ManifestPoll] = {}
        self._said: dict[str, str] = {}
        self._reset = False

    def reset(self) -> None:
        """Forget every hold before the next fetch (a key added, room made: try again)."""
        self._reset = True

    def fetch(self, client: HttpClient, needed: Iterable[str], cached: Iterable[str], verify: Verify,
              install: Install, serving: str | None) -> None:
        """Fetch, verify and install each needed version not cached; network trouble stops the round."""
        if self._reset:
            self._reset = False
            self._polls.clear()
            self._said.clear()
        missing = sorted(_versions(set(needed) - set(cached)), key=Version)
        for gone in set(self._polls) - set(missing):
            del self._polls[gone]  # cached now, or no plan needs it any more
            self._said.pop(gone, None)
        for version in missing:
            if not self._fetch_one(client, version, verify, install, serving):
                return

    def _fetch_one(self, client: HttpClient, version: str, verify: Verify, install: Install, serving: str | None) -> bool:
        """False when the dashboard could not be reached (the rest waits for the next poll)."""
        paths = release_paths(version)
        poll = self._polls.setdefault(version, ManifestPoll())
        try:
            fetched = client.get_small(paths[0], MAX_MANIFEST_BYTES, etag=poll.etag(time.monotonic()))
            if fetched.status == 304:
                return True  # the pair refused last time, still held
            key = hashlib.sha256(fetched.body).hexdigest()
            if not poll.held(key, time.monotonic()):
                try:
                    signed, body, bundle = client.verified_manifest(fetched.body, _naming(version, verify), paths)
                    install(signed, body, bundle)
                except TrustError as exc:
                    poll.reject(key, time.monotonic())
                    keeping = f"; still serving app {serving} as the newest" if serving else ""
                    log.warning("rejected app %s, which a rollout plan needs (%s): %s%s", version, paths[0], exc, keeping)
            poll.seen(fetched.etag, key)
        except HttpStatusError as exc:
            if exc.status != 404:
                return self._problem(version, f"cannot fetch app {version}, which a rollout plan needs: {exc}", False)
            return self._problem(version, f"the dashboard has no release {version}, which a rollout plan needs "
                                          f"(robots it assigns are held): {exc}", True)
        except TransportError as exc:
            return self._problem(version, f"cannot fetch app {version}, which a rollout plan needs (retrying): {exc}", False)
        except OtadError as exc:  # e.g. disk full while installing: tried again at the next poll
            return self._problem(version, f"cannot cache app {version}, which a rollout plan needs: {exc}", False)
        self._said.pop(version, None)
        return True

    def _problem(self, version: str, reason: str, go_on: bool) -> bool:
        if self._said.get(version) != reason:
            log.warning("%s", reason)
        self._said[version] = reason
        return go_on


def _naming(version: str, verify: Verify) -> Verify:
    """verify, and the verified manifest must be of `version`: another signed release
    served under this version's name is refused, not cached in its place."""
    def check(manifest: bytes, bundle: bytes) -> SignedManifest:
        signed = verify(manifest, bundle)
        if signed.manifest.version != version:
            raise MalformedMetadata(f"the manifest served for {version} is of {signed.manifest.version}")
        return signed
    return check


def _versions(texts: Iterable[str]) -> list[str]:
    # Needed versions come from verified plans and from robots' reported versions: only
    # well-formed ones become a URL.
    out = []
    for text in texts:
        try:
            out.append(Version(text).text)
        except MalformedMetadata:
            continue
    return out
