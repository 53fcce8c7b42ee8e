"""The gateway's sync worker: poll the dashboard, download resumably, verify, cache, GC.

A new manifest is accepted only with a valid manifest.json.bundle from a
trusted key and while it has not expired; the release must then match it
(size, sha256, checksum file, bundle digest, the archive's VERSION). Anything
else is refused with one log line, and robots keep getting what is cached.
A version below the highest this gateway has verified (gateway/floor.py, on
disk) is refused unless its signed manifest says `allow_downgrade` and is not
older than the newest manifest accepted: a replayed old manifest cannot freeze
the site on an old release. Runs in its own thread. Network trouble backs off
exponentially (with jitter, capped at BACKOFF_MAX); a manifest whose release
fails verification is held back (transfer/backoff.py ManifestPoll) until the
dashboard publishes a different manifest, the hold ends, or SIGHUP, so a bad
release does not cost the WAN a download every poll, and is tried again once
its cause may be gone.

With rollouts, each poll that reached the dashboard also fetches the releases a
current plan needs and the cache lacks (gateway/planned.py), through the same
verification and download as the newest one; they are cached beside it, never
made the active release, and never move the floor.

With site orchestration (issue 16), each poll that reached the dashboard also
sends the site view (gateway/siteview.py: the snapshot callable given to the
Syncer, when it changed or a minute passed); it never holds the release sync.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from otad.errors import OtadError, TransportError, TrustError
from otad.gateway.cache import Cache
from otad.gateway.floor import FloorStore
from otad.gateway.planned import PlannedReleases
from otad.gateway.rollouts import MAX_PLANS_BYTES, Rollouts
from otad.gateway.settings import GatewaySettings
from otad.gateway.siteview import SiteViewSender
from otad.transfer.backoff import Backoff, ManifestPoll, jittered
from otad.transfer.client import MANIFEST_PATH, HttpClient, TransferLimits
from otad.transfer.tls import client_tls
from otad.trust import clock
from otad.trust.archive_head import check_archive_version
from otad.trust.bundle import MAX_BUNDLE_BYTES
from otad.trust.manifest import MAX_CHECKSUM_BYTES, MAX_MANIFEST_BYTES, Manifest, parse_manifest
from otad.trust.metadata import SignedManifest, describe_age, verify_manifest
from otad.trust.rollback import RollbackRefused, decide_install
from otad.trust.verify import TrustAnchors, verify_artifact
from otad.daemon import Heartbeat

log = logging.getLogger("otad.gateway")
ROLLOUTS_PATH = "/rollouts.json"  # Wire 1 (docs/formats.md)
SITE_REPORT_PATH = "/rollouts/site-report"  # Wire 4


@dataclass
class SyncState:
    """What the sync worker is doing, for STATUS= and logs. Written by one thread."""

    downloading: str | None = None
    received: int = 0
    total: int = 0
    wan_down_since: float | None = None
    last_error: str | None = None


class Syncer:
    def __init__(self, settings: GatewaySettings, cache: Cache, heartbeat: Heartbeat, rollouts: Rollouts | None = None,
                 snapshot: Callable[[float], dict] | None = None) -> None:
        """`snapshot`: the site orchestrator's snapshot(now) for the site view (None: nothing to send)."""
        self.cache = cache
        self.rollouts = rollouts
        self.site_view = SiteViewSender(snapshot) if snapshot is not None else None
        self.token: str | None = None  # this gateway's dashboard token (Wire 4), set by main
        self._rollout_error: str | None = None
        self.heartbeat = heartbeat
        self.state = SyncState()
        self._wake = threading.Event()
        self._stop = False
        self._polls = ManifestPoll()  # the ETag and the hold on a refused manifest
        self._backoff = Backoff()
        self._next_gc = 0.0
        self._parts: dict[str, str] = {}  # "newest" / "planned": the .part being fetched, kept from GC
        self._planned = PlannedReleases()
        self._warned_expired: bytes | None = None
        self._floors = FloorStore(settings.state_dir)
        active = cache.snapshot.active
        self.floor = self._floors.load(active.manifest if active is not None else None)
        self.apply(settings)

    def apply(self, settings: GatewaySettings) -> None:
        """New settings take effect at the next poll (SIGHUP)."""
        self.settings = settings
        self.cache.anchors = TrustAnchors(cosign_keys=settings.trusted_keys, gpg_keyring=settings.trusted_gpg_keyring)
        self._backoff.cap = settings.backoff_max
        limits = TransferLimits(settings.connect_timeout, settings.read_timeout, settings.min_rate)
        old = getattr(self, "client", None)
        self.client = HttpClient(settings.dashboard_url, limits, tls=client_tls(settings, "dashboard_ca_file"))
        if old is not None:
            old.close()
        self._next_gc = 0.0  # new bounds apply now, not at the old interval's end
        self._polls.reset()  # e.g. CACHE_MAX_MB raised or a key added: a refused manifest may pass now
        self._planned.reset()
        if self.rollouts is not None:
            self.rollouts.configure(settings.rollout_keys, settings.trusted_keys)
        self._wake.set()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()

    def run(self) -> None:
        while not self._stop:
            self.heartbeat.beat()
            delay = self.sync_once()
            self._gc_if_due()
            self.heartbeat.beat()
            self._wake.wait(delay)
            self._wake.clear()
        self.client.close()

    # -- one poll -------------------------------------------------------------------
    def sync_once(self) -> float:
        """Poll once (the release, the rollout plans, the site view); return seconds until the next poll."""
        delay, reachable = self._sync_release()
        if self.rollouts is not None and self.rollouts.enabled:
            self._sync_rollouts(reachable)
        if reachable and self.site_view is not None:
            self.site_view.send(self.client, self.token, clock.now())
        return delay

    def _sync_release(self) -> tuple[float, bool]:
        """(delay, the dashboard answered)."""
        try:
            self._poll()
        except TransportError as exc:
            return self._network_failure(str(exc)), False
        except TrustError as exc:  # e.g. a /manifest over 64 KiB: the server is at fault, retry later
            return self._network_failure(f"refused the dashboard's answer: {exc}"), True
        except OtadError as exc:  # e.g. disk full while installing: retry like a network error
            return self._network_failure(f"cannot install: {exc}"), True
        finally:
            self.state.downloading = None
        self._backoff.success()
        if self.state.wan_down_since is not None:
            log.info("dashboard reachable again after %.0fs", time.time() - self.state.wan_down_since)
        self.state.wan_down_since = None
        self.state.last_error = None
        return jittered(self.settings.poll_interval), True

    # -- rollouts (issue 15) ------------------------------------------------------------
    def _sync_rollouts(self, reachable: bool) -> None:
        """Wire 1 when the dashboard answers; then the site's phase decisions, online or not;
        then Wire 4 (the site's report) while it is reachable."""
        now = clock.now()
        online = reachable and self._fetch_plans(now)
        try:
            self.rollouts.expire(now)
            self.rollouts.decide(now, online)
            if online:
                self._send_reports(now)
        except OtadError as exc:  # e.g. disk full: the decision is made again at the next poll
            log.error("rollout: cannot persist the site's rollout state: %s", exc)
        if online:
            self._fetch_planned()

    def _fetch_planned(self) -> None:
        """The releases current plans need that the cache lacks (gateway/planned.py)."""
        snapshot = self.cache.snapshot
        try:
            self._planned.fetch(self.client, self.rollouts.needed_versions(), snapshot.releases, self._verify,
                                lambda signed, body, bundle: self._fetch_and_install(signed, body, bundle, newest=False),
                                snapshot.active.manifest.version if snapshot.active else None)
        finally:
            self.state.downloading = None

    def _fetch_plans(self, now: float) -> bool:
        try:
            fetched = self.client.get_small(ROLLOUTS_PATH, MAX_PLANS_BYTES)
        except TransportError as exc:
            self._rollout_problem(f"cannot fetch the dashboard's rollout plans (the site counts as offline): {exc}")
            return False
        except TrustError as exc:
            self._rollout_problem(f"refused the dashboard's rollouts.json (the site counts as offline): {exc}")
            return False
        self._rollout_error = None
        self.rollouts.take_plans(fetched.body, now)
        return True

    def _send_reports(self, now: float) -> None:
        if self.token is None:
            self._rollout_problem("site reports not sent: TOKEN_FILE is not set")
            return
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        for rid, body, digest in self.rollouts.reports(now):
            try:
                status, reply = self.client.post(SITE_REPORT_PATH, body, headers)
            except TransportError as exc:
                self._rollout_problem(f"site report for rollout {rid} not sent, retrying: {exc}")
                return
            if status != 200:
                error = reply.get("error") if isinstance(reply, dict) else None
                self._rollout_problem(f"the dashboard refused the site report for rollout {rid} (HTTP {status}"
                                      f"{': ' + str(error)[:200] if error else ''}), retrying")
                continue
            self.rollouts.reported(rid, digest)
            log.info("rollout %s: site report sent to the dashboard", rid)

    def _rollout_problem(self, reason: str) -> None:
        if reason != self._rollout_error:
            log.warning("rollout: %s", reason)
        self._rollout_error = reason

    def _network_failure(self, reason: str) -> float:
        delay = min(self._backoff.failure(), self.settings.backoff_max)
        if self.state.wan_down_since is None:
            self.state.wan_down_since = time.time()
        if reason != self.state.last_error:
            log.warning("sync failed, retrying in %.0fs: %s", delay, reason)
        self.state.last_error = reason
        return delay

    def _poll(self) -> None:
        fetched = self.client.get_small(MANIFEST_PATH, MAX_MANIFEST_BYTES, etag=self._polls.etag(time.monotonic()))
        if fetched.status == 304:  # the manifest dealt with last time (installed, or refused and still held)
            self._warn_if_expired()
            return
        body = fetched.body
        key = hashlib.sha256(body).hexdigest()
        active = self.cache.snapshot.active
        if active is not None and active.manifest_bytes == body:
            self._polls.seen(fetched.etag, key)
            self._warn_if_expired()
            return
        if self._polls.held(key, time.monotonic()):
            self._polls.seen(fetched.etag, key)
            return
        try:
            signed, newest, manifest_bundle = self.client.verified_manifest(body, self._verify)
            self._fetch_and_install(signed, newest, manifest_bundle)
        except TrustError as exc:
            self._reject(key, body, exc)
        # Not reached on a cut download or a disk error: the next poll looks again.
        self._polls.seen(fetched.etag, key)

    def _verify(self, manifest_bytes: bytes, bundle: bytes) -> SignedManifest:
        return verify_manifest(manifest_bytes, bundle, self.cache.anchors, clock.now())

    def _warn_if_expired(self) -> None:
        """The dashboard still publishes a manifest that has expired: robots accept it only within their grace."""
        active = self.cache.snapshot.active
        if active is None or active.manifest_bytes == self._warned_expired:
            return
        overdue = clock.now() - active.manifest.expires_epoch
        if overdue > 0:
            self._warned_expired = active.manifest_bytes
            log.warning("the manifest of app %s being served expired at %s (%s ago): publish or re-sign a fresh one; "
                        "robots accept it only within their MANIFEST_GRACE_S", active.manifest.version,
                        active.manifest.expires, describe_age(overdue))

    def _reject(self, key: str, body: bytes, exc: TrustError) -> None:
        self._polls.reject(key, time.monotonic())
        what = _describe(body)
        active = self.cache.snapshot.active
        keeping = f"; keeping app {active.manifest.version}" if active is not None else ""
        log.warning("rejected %s: %s%s", what, exc, keeping)
        self._parts.pop("newest", None)

    def _fetch_and_install(self, signed: SignedManifest, body: bytes, manifest_bundle: bytes, newest: bool = True) -> None:
        """Download, verify and cache a verified manifest's release. `newest`: from /manifest, it
        becomes the active release and moves the floor; otherwise (a release a plan needs, fetched
        by version) it is only cached beside the active one, and the floor is not consulted: it
        governs what this gateway serves as its newest release (docs/security.md)."""
        manifest = signed.manifest
        role = "newest" if newest else "planned"
        downgrade = self._check_floor(manifest) if newest else False
        reason = self.cache.room_for(manifest.size, self.settings.cache_max_bytes)
        if reason is not None:
            raise CacheFull(reason)
        bundle = self.client.get_small(f"/ota/{manifest.bundle}", MAX_BUNDLE_BYTES).body
        checksum = self.client.get_small(f"/ota/{manifest.checksum}", MAX_CHECKSUM_BYTES).body
        artifact = self.cache.cached_artifact(manifest)
        if artifact is None:
            artifact = self.cache.partial_path(manifest.artifact)
            self._parts[role] = artifact.name
            self.cache.gc(self.settings.cache_keep_versions, self.settings.cache_max_bytes, reserve=manifest.size,
                          keep_parts=frozenset(self._parts.values()), protect=self._protected())
            self.state.downloading, self.state.received, self.state.total = manifest.version, 0, manifest.size
            log.info("downloading %s %s (%d bytes)", manifest.name, manifest.version, manifest.size)
            observed = self.client.download(f"/ota/{manifest.artifact}", artifact, manifest.size, self._progress)
        else:
            observed = None
        try:
            verified = verify_artifact(artifact, manifest, bundle, self.cache.anchors, checksum_bytes=checksum, observed=observed)
            check_archive_version(artifact, manifest.version)
        except TrustError:
            if artifact.name.endswith(".part"):
                artifact.unlink(missing_ok=True)
                artifact.with_name(artifact.name + ".meta").unlink(missing_ok=True)
            self._parts.pop(role, None)
            raise
        if newest:
            floor = self.floor.after(manifest, downgrade)
            if floor != self.floor:
                self._floors.save(floor)  # before robots are served the release: never below what is served
                self.floor = floor
        self.cache.install(manifest, body, manifest_bundle, artifact, bundle, checksum, activate=newest)
        self._parts.pop(role, None)
        self._gc_if_due(force=True)
        facts = (f"sha256 {verified.sha256[:12]}..., key {verified.key}; manifest signed by {signed.key}, "
                 f"expires {manifest.expires}")
        if newest:
            log.info("verified %s %s (%s); serving it to robots", manifest.name, manifest.version, facts)
        else:
            active = self.cache.snapshot.active
            log.info("verified %s %s (%s); cached for the rollout plans that assign it, not as the newest release%s",
                     manifest.name, manifest.version, facts, f" (still {active.manifest.version})" if active else "")

    def _check_floor(self, manifest: Manifest) -> bool:
        """Refuse a version below the highest this gateway verified; True for an authorised downgrade."""
        decision = decide_install(manifest.version, None, self.floor.highest, (), manifest.allow_downgrade,
                                  highest_is="the highest version this gateway verified",
                                  created=manifest.created_epoch, newest_created=self.floor.newest_created)
        if not decision.install:
            raise RollbackRefused(decision.reason)
        return decision.downgrade

    def _progress(self, received: int, total: int) -> None:
        self.state.received, self.state.total = received, total
        self.heartbeat.beat()
        if self._stop:
            raise TransportError("stopping")

    def _gc_if_due(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_gc:
            return
        self._next_gc = now + self.settings.cache_gc_interval
        try:
            self.cache.gc(self.settings.cache_keep_versions, self.settings.cache_max_bytes, keep_parts=frozenset(self._parts.values()),
                          protect=self._protected())
        except OSError as exc:
            log.error("cache gc failed: %s", exc)


    def _protected(self) -> frozenset[str]:
        return self.rollouts.needed_versions() if self.rollouts is not None and self.rollouts.enabled else frozenset()


class CacheFull(TrustError):
    """Not a trust failure, but handled like one: the same manifest is not retried at
    once, and the active release is never evicted to make room."""


def _describe(body: bytes) -> str:
    try:
        manifest = parse_manifest(body)
    except OtadError:
        return "manifest"
    return f"{manifest.name} {manifest.version}"
