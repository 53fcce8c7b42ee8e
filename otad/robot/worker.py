"""The robot's worker thread: poll the gateway, download, verify, hand over to the installer.

The robot trusts nothing because the gateway said so: it verifies the
manifest's signature and expiry (with MANIFEST_GRACE_S of tolerance, for
releases a gateway cut off from the dashboard still holds) and every artifact
against its own TRUSTED_KEYS with the shared verification core, and never goes
below its anti-rollback floor unless the signed manifest authorises it.

With ROLLOUT_KEYS it also fetches the gateway's /rollout.json every poll and
installs only what a current signed plan assigns to this robot (rollouts.py);
the one downgrade a plan authorises is an aborted plan's return to the version
this robot itself came from. With TOKEN_FILE every request carries the robot's
token, which is how the gateway tells its robots apart.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time

from otad.daemon import Heartbeat
from otad.errors import ConfigError, OtadError, TransportError, TrustError
from otad.fsutil import atomic_write_bytes, make_dirs
from otad.robot.crashpoints import crashpoint
from otad.robot.installer import Installer
from otad.robot.leaseclient import LeaseClient
from otad.robot.orchestrate import UpdateGate
from otad.robot.rollouts import MAX_ROLLOUT_BYTES, ROLLOUT_PATH, Admission, RolloutGate, RolloutRefused
from otad.robot.settings import RobotSettings
from otad.semver import same_version, version_in
from otad.transfer.backoff import Backoff, ManifestPoll, jittered
from otad.telemetry.tokens import read_own_token
from otad.transfer.client import MANIFEST_PATH, HttpClient, HttpStatusError, TransferLimits
from otad.transfer.tls import client_tls
from otad.trust import clock
from otad.trust.bundle import MAX_BUNDLE_BYTES
from otad.trust.manifest import MAX_CHECKSUM_BYTES, MAX_MANIFEST_BYTES, Manifest, parse_manifest, utc_timestamp
from otad.trust.metadata import SignedManifest, describe_age, verify_manifest
from otad.trust.rollback import RollbackRefused, decide_install
from otad.trust.verify import TrustAnchors, verify_artifact

log = logging.getLogger("otad.robot")
IDLE_BEAT_EVERY = 1.0  # seconds: under any STALL_TIMEOUT (at least 1)


class Worker:
    def __init__(self, settings: RobotSettings, installer: Installer, heartbeat: Heartbeat) -> None:
        self.installer = installer
        self.heartbeat = heartbeat
        self.downloads = settings.state_dir / "downloads"
        make_dirs(self.downloads)
        self._wake = threading.Event()
        self._stop = False
        self._backoff = Backoff()
        self._polls = ManifestPoll()  # the ETag and the hold on a refused manifest
        self.downloading: tuple[str, int, int] | None = None  # version, received, total
        self.rollouts = RolloutGate(settings.state_dir)
        self._rollout_body: bytes | None = None  # this poll's /rollout.json (None: the gateway has none)
        self._rollout_digest = ""
        self.token: str | None = None
        self.apply(settings)
        # Download-ahead: the verified release waiting for READY_CMD or a lease, kept across polls
        # ((artifact name, sha256), its file), so waiting costs no second download nor re-hash.
        self._staged: tuple[tuple[str, str], object] | None = None
        self._retry_in: float | None = None  # this poll's wait for readiness or a lease: poll again sooner
        self.gate = UpdateGate(settings, LeaseClient(lambda: self.client), beat=heartbeat.beat)

    def apply(self, settings: RobotSettings) -> None:
        self.settings = settings
        self.installer.settings = settings
        if hasattr(self, "gate"):
            self.gate.settings = settings
        self.anchors = TrustAnchors(cosign_keys=settings.trusted_keys, gpg_keyring=settings.trusted_gpg_keyring)
        self._backoff.cap = settings.backoff_max
        self.token = self._read_token(settings)
        old = getattr(self, "client", None)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        self.client = HttpClient(settings.gateway_url, TransferLimits(settings.connect_timeout, settings.read_timeout, settings.min_rate),
                                 headers=headers, tls=client_tls(settings, "gateway_ca_file"))
        if old is not None:
            old.close()
        self._polls.reset()  # SIGHUP: whatever made a manifest fail may be fixed now
        self._wake.set()

    def _read_token(self, settings: RobotSettings) -> str | None:
        """The token for every request to the gateway (never logged). At start a bad file stops
        the daemon (ConfigError); at a reload the token read before is kept."""
        if settings.token_file is None:
            return None
        try:
            return read_own_token(settings.token_file)
        except ConfigError as exc:
            if self.token is None:
                raise
            log.error("%s; keeping the token read before", exc)
            return self.token

    def stop(self) -> None:
        self._stop = True
        self._wake.set()

    def run(self) -> None:
        while not self._stop:
            self.heartbeat.beat()
            if self.installer.check_probation():
                delay = float(self.settings.health_interval)
            else:
                delay = self.poll_once()
            self._idle(delay)
            self._wake.clear()
        self.client.close()

    def _idle(self, delay: float) -> None:
        """Wait `delay` seconds (or until woken), beating: a planned wait is not a stall,
        whatever POLL_INTERVAL or BACKOFF_MAX say, and it ends at its own deadline."""
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            self.heartbeat.beat()
            if self._wake.wait(min(left, IDLE_BEAT_EVERY)):
                break
        self.heartbeat.beat()

    def poll_once(self) -> float:
        # otadctl may have changed the blacklist since the last poll: look again at
        # the gateway's manifest even if it has not changed.
        blacklist = list(self.installer.state.blacklist)
        self.installer.state = self.installer.store.load()
        if self.installer.state.blacklist != blacklist:
            self._polls.forget()
        self._retry_in = None
        try:
            self.gate.settle(self.installer.app.target("CURRENT"))  # a lease left over from a kill -9
            if self.settings.rollout_keys:
                self._fetch_rollouts()
            fetched = self.client.get_small(MANIFEST_PATH, MAX_MANIFEST_BYTES, etag=self._polls.etag(time.monotonic()))
            atomic_write_bytes(self.settings.state_dir / "last_poll", utc_timestamp(time.time()).encode())
            if fetched.status == 200:
                # With rollouts, a refusal holds this manifest under this set of plans only.
                digest = hashlib.sha256(fetched.body + self._rollout_digest.encode()).hexdigest()
                # Dealt with unless _consider says otherwise: it refuses (held), or forgets to retry.
                self._polls.seen(fetched.etag, digest)
                self._consider(fetched.body, digest)
        except TransportError as exc:
            # The manifest's ETag is already noted: a download cut after it would otherwise
            # never be resumed (every later poll answered 304) until the gateway's manifest changes.
            self._polls.forget()
            delay = min(self._backoff.failure(), self.settings.backoff_max)
            log.warning("gateway unreachable, retrying in %.0fs: %s", delay, exc)
            return delay
        except TrustError as exc:  # e.g. a /manifest over 64 KiB: the gateway is at fault, retry later
            self._polls.forget()
            delay = min(self._backoff.failure(), self.settings.backoff_max)
            log.warning("refused the gateway's answer, retrying in %.0fs: %s", delay, exc)
            return delay
        except OtadError as exc:  # disk trouble while installing: not the release's fault
            log.error("install interrupted: %s", exc)
            self._polls.forget()
        except Exception as exc:  # a bug must not end the worker: repair the state and go on
            log.error("unexpected %s during poll/install: %s; recovering", type(exc).__name__, exc)
            self._polls.forget()
            try:
                self.installer.recover()
            except Exception as again:
                log.error("recovery failed too: %s: %s", type(again).__name__, again)
            return min(self._backoff.failure(), self.settings.backoff_max)
        finally:
            self.downloading = None
            self.installer.step = ""
        self._backoff.success()
        delay = jittered(self.settings.poll_interval)
        return delay if self._retry_in is None else max(0.5, min(delay, self._retry_in))

    def _fetch_rollouts(self) -> None:
        """This poll's /rollout.json. Other plans than last poll's: look at the manifest again,
        even one held back, since what the plans assign may have changed."""
        try:
            body: bytes | None = self.client.get_small(ROLLOUT_PATH, MAX_ROLLOUT_BYTES).body
        except HttpStatusError as exc:
            if exc.status != 404:
                raise
            body = None  # a gateway without rollouts: no plan assigns anything
        except TrustError as exc:  # larger than any gateway sends
            log.warning("refused the gateway's %s: %s", ROLLOUT_PATH, exc)
            body = b""
        digest = hashlib.sha256(b"none" if body is None else b"body" + body).hexdigest()
        if digest != self._rollout_digest:
            self._polls.forget()
        self._rollout_body, self._rollout_digest = body, digest

    def _admit(self, version: str) -> Admission:
        """The plan that assigns `version` to this robot (RolloutRefused if none does)."""
        settings, state = self.settings, self.installer.state
        current = self.installer.app.target("CURRENT")
        plans = self.rollouts.current_plans(self._rollout_body, settings.rollout_keys, settings.trusted_keys,
                                            clock.now(), settings.manifest_grace_s)
        rollout = state.rollout or {}
        came_from = rollout.get("came_from") if same_version(rollout.get("version"), current) else None
        return self.rollouts.admit(plans, settings.robot_id, current, version, came_from)

    def _consider(self, body: bytes, digest: str) -> None:
        if self._polls.held(digest, time.monotonic()):
            return
        try:
            manifest = parse_manifest(body)
        except TrustError as exc:
            self._reject(digest, None, exc)
            return
        state = self.installer.state
        if version_in(manifest.version, state.blacklist) or same_version(manifest.version, self.installer.app.target("CURRENT")):
            self._unstage(f"the gateway offers {manifest.version}, which is current or blacklisted")
            return  # nothing to do, whatever its signature says
        installing = False
        try:
            signed, _, _ = self.client.verified_manifest(body, self._verify)
            if signed.manifest.version != manifest.version:
                self._polls.forget()  # the gateway switched releases meanwhile: look again next poll
                return
            admission = self._admit(manifest.version) if self.settings.rollout_keys else None
            plan_downgrade = admission is not None and admission.rollback
            decision = decide_install(manifest.version, self.installer.app.target("CURRENT"), state.highest_committed,
                                      state.blacklist, signed.manifest.allow_downgrade or plan_downgrade,
                                      self.settings.allow_downgrade)
            if not decision.install:
                if not decision.quiet:
                    self._reject(digest, manifest, RollbackRefused(decision.reason))
                return
            manifest = signed.manifest
            artifact = self._stage(manifest)
            verdict = self.gate.admit(manifest.version, admission.force_after_s if admission else None)
            if not verdict.go:
                self._polls.forget()  # look at the manifest again at the next poll: it may have changed
                self._retry_in = verdict.delay
                return
            installing = True
            committed = self._install(manifest, artifact, decision, admission, plan_downgrade)
        except TrustError as exc:
            if installing:  # the unpacker refused the archive: kept on disk, verified again on a later try
                self._staged = None
            else:
                self._unstage(f"refused: {exc}")
            self._reject(digest, manifest, exc)
            return
        self._unstage("")
        if not committed:
            self._polls.forget()  # try this version again on a later poll, until it is blacklisted

    def _stage(self, manifest: Manifest):
        """The verified artifact of `manifest`: the one staged at an earlier poll, or downloaded now."""
        key = (manifest.artifact, manifest.sha256)
        if self._staged is not None and self._staged[0] == key and self._staged[1].exists():
            return self._staged[1]
        self._unstage("")
        self._staged = (key, self._fetch(manifest))
        return self._staged[1]

    def _unstage(self, why: str) -> None:
        """Drop the staged release (installed, or no longer wanted: `why`)."""
        if self._staged is not None:
            artifact = self._staged[1]
            artifact.unlink(missing_ok=True)
            artifact.with_name(artifact.name + ".meta").unlink(missing_ok=True)
            self._staged = None
            if why:
                self.gate.drop(why)

    def _install(self, manifest: Manifest, artifact, decision, admission: Admission | None, plan_downgrade: bool) -> bool:
        """Install holding the lease (renewed meanwhile), then give it back: at the commit, before
        any probation, or at the rollback. True if committed."""
        outcome = "rolled_back"
        self.gate.renew_while_installing()
        try:
            committed = self.installer.install(manifest, artifact, downgrade=decision.downgrade,
                                               rollout=self._rollout_record(admission), plan_downgrade=plan_downgrade)
            outcome = "committed" if committed else "rolled_back"
            return committed
        finally:
            self.gate.finish(outcome)

    def _rollout_record(self, admission: Admission | None) -> dict | None:
        """What RobotState.rollout keeps of the plan behind this install; None without one."""
        if admission is None:
            return None
        log.info("rollout %s revision %d assigns app %s to robot %s: %s", admission.rollout_id, admission.revision,
                 admission.version, self.settings.robot_id, admission.reason)
        if admission.rollback:
            return None  # the return is not an attempt of the phase: its events carry no rollout
        return {"rollout_id": admission.rollout_id, "phase": admission.phase, "version": admission.version,
                "came_from": self.installer.app.target("CURRENT")}

    def _verify(self, manifest_bytes: bytes, bundle: bytes) -> SignedManifest:
        signed = verify_manifest(manifest_bytes, bundle, self.anchors, clock.now(), grace=self.settings.manifest_grace_s)
        if signed.expired_for > 0:
            log.warning("accepting the manifest of app %s although it expired %s ago (within MANIFEST_GRACE_S=%d; "
                        "the gateway may be cut off from the dashboard)", signed.manifest.version,
                        describe_age(signed.expired_for), self.settings.manifest_grace_s)
        return signed

    def _fetch(self, manifest: Manifest):
        bundle = self.client.get_small(f"/ota/{manifest.bundle}", MAX_BUNDLE_BYTES).body
        checksum = self.client.get_small(f"/ota/{manifest.checksum}", MAX_CHECKSUM_BYTES).body
        part = self.downloads / f"{manifest.artifact}.part"
        for stale in self.downloads.iterdir():
            if stale.name not in (part.name, part.name + ".meta"):
                stale.unlink(missing_ok=True)  # an older release's leftovers
        self.downloading = (manifest.version, 0, manifest.size)
        log.info("downloading app %s (%d bytes)", manifest.version, manifest.size)
        observed = self.client.download(f"/ota/{manifest.artifact}", part, manifest.size, self._progress)
        crashpoint("downloaded")
        try:
            verified = verify_artifact(part, manifest, bundle, self.anchors, checksum_bytes=checksum, observed=observed)
        except TrustError:
            part.unlink(missing_ok=True)
            part.with_name(part.name + ".meta").unlink(missing_ok=True)
            raise
        log.info("verified app %s (sha256 %s..., key %s)", manifest.version, verified.sha256[:12], verified.key)
        crashpoint("verified")
        return part

    def _progress(self, received: int, total: int) -> None:
        if self.downloading is not None:
            self.downloading = (self.downloading[0], received, total)
        self.heartbeat.beat()
        if self._stop:
            raise TransportError("stopping")

    def _reject(self, digest: str, manifest: Manifest | None, exc: TrustError) -> None:
        self._polls.reject(digest, time.monotonic())
        version = manifest.version if manifest else None
        self.installer.outbox.add("rejected", version, str(exc))
        if isinstance(exc, RolloutRefused):
            log.warning("refused app %s for robot %s: %s", version, self.settings.robot_id, exc)
        else:
            log.warning("rejected app %s: %s", version or "manifest", exc)

