"""Install, activate, self-test, commit or roll back: the robot's state machine.

Every step is preceded by persisting the phase (StateStore.save, atomic), and
every link change is a rename(2), so `recover()` can finish or undo whatever a
crash interrupted. The rule it restores: CURRENT resolves to a complete,
committed release (or, on a robot that never committed one, does not exist).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from otad.errors import OtadError
from otad.robot import runner
from otad.robot.crashpoints import crashpoint
from otad.robot.layout import AppDir
from otad.robot.outbox import Outbox
from otad.robot.settings import RobotSettings
from otad.robot.state import StateLock, StateStore
from otad.robot.unpack import unpack_release
from otad.trust.manifest import Manifest, utc_timestamp
from otad.trust.rollback import decide_install, next_floor

log = logging.getLogger("otad.robot")


class Installer:
    def __init__(self, settings: RobotSettings, store: StateStore, lock: StateLock, outbox: Outbox) -> None:
        self.settings = settings
        self.app = AppDir(settings.app_dir)
        self.store = store
        self.lock = lock
        self.outbox = outbox
        self.state = store.load()
        self.step = ""  # for STATUS=

    def save(self, **changes) -> None:
        for key, value in changes.items():
            setattr(self.state, key, value)
        self.store.save(self.state)

    # -- install ------------------------------------------------------------------------
    def install(self, manifest: Manifest, artifact: Path, downgrade: bool = False) -> bool:
        """Unpack a verified artifact and activate it. True if it was committed.

        `downgrade`: an authorised downgrade (the signed manifest allows it), which
        lowers the anti-rollback floor to this version once committed.
        """
        version = manifest.version
        with self.lock:
            self.state = self.store.load()  # otadctl may have changed it since the last poll
            decision = decide_install(version, self.app.target("CURRENT"), self.state.highest_committed, self.state.blacklist,
                                      manifest.allow_downgrade, self.settings.allow_downgrade)
            if not decision.install:
                log.info("not installing app %s: %s", version, decision.reason)
                return False
            self.step = "unpacking"
            self.save(phase="unpacking", target=version)
            self.app.remove_release(version)  # leftovers of an abandoned attempt
            try:
                unpack_release(artifact, self.app.release_dir(version), version,
                               self.settings.max_unpacked_bytes, self.settings.max_files)
            except OtadError:
                self.app.remove_release(version)
                self.save(phase="idle", target=None)
                raise
            self.app.mark_complete(version, manifest.sha256)
            crashpoint("unpacked")
            self.app.set_link("NEW", version)
            crashpoint("new-linked")
            self._activate(version)
            return self._prove(version, decision.downgrade)

    def _activate(self, version: str) -> None:
        self.step = "activating"
        previous, previous_old = self.app.target("CURRENT"), self.app.target("OLD")
        self.save(phase="activating", previous=previous, previous_old=previous_old)
        if previous is not None:
            self.app.set_link("OLD", previous)
        crashpoint("old-linked")
        self.app.set_link("CURRENT", version)
        crashpoint("current-linked")
        self.app.remove_link("NEW")
        crashpoint("new-removed")
        self.save(phase="selftest")
        log.info("activated app %s (previous %s); restarting the app and running its self-test", version, previous or "none")

    def _prove(self, version: str, downgrade: bool = False) -> bool:
        self.step = "self-test"
        failure = self._restart_and_selftest(version)
        if failure is not None:
            self.rollback(version, failure)
            return False
        crashpoint("selftest-passed")
        self._commit(version, downgrade)
        return True

    def _restart_and_selftest(self, version: str) -> str | None:
        release = self.app.root / "CURRENT"
        env = {"OTAD_VERSION": version, "OTAD_RELEASE_DIR": str(release.resolve()), "OTAD_APP_DIR": str(self.app.root)}
        if self.settings.restart_cmd:
            outcome = runner.run(self.settings.restart_cmd, self.settings.selftest_timeout, env=env)
            if not outcome.ok:
                return _reason("restart command failed", outcome)
        crashpoint("restarted")
        if self.app.target("CURRENT") != version or not (release / "VERSION").is_file():
            return "CURRENT does not hold the release's files"
        command = self.settings.selftest_cmd
        if not command and (release / "selftest").is_file():
            command = str(release.resolve() / "selftest")
        if not command:
            log.info("app %s has no self-test (no SELFTEST_CMD, no ./selftest); accepting it", version)
            return None
        outcome = runner.run(command, self.settings.selftest_timeout, cwd=release.resolve(), env=env)
        return None if outcome.ok else _reason("self-test failed", outcome)

    def _commit(self, version: str, downgrade: bool = False) -> None:
        # Probation needs something to roll back to; a robot's first release stays either way.
        probation = self.settings.probation_s > 0 and bool(self.settings.health_cmd) and self.state.previous is not None
        # The anti-rollback floor, in the same atomic state write as the commit itself.
        highest = next_floor(self.state.highest_committed, version, downgrade)
        attempts = {v: n for v, n in self.state.attempts.items() if v != version}
        self.save(
            phase="probation" if probation else "idle", committed=version, highest_committed=highest, attempts=attempts,
            probation_until=time.time() + self.settings.probation_s if probation else None,
            target=version if probation else None,
            # Kept only while on probation: a failed health check rolls back to them.
            previous=self.state.previous if probation else None,
            previous_old=self.state.previous_old if probation else None,
        )
        crashpoint("committed")
        self.outbox.add("installed", version)
        log.info("installed app %s%s", version, f"; on probation for {self.settings.probation_s}s" if probation else "")
        self.gc()
        crashpoint("gc-done")

    # -- rollback -------------------------------------------------------------------------
    def rollback(self, version: str, reason: str) -> None:
        """Back to the release that was CURRENT before `version` was activated."""
        self.step = "rolling back"
        previous, previous_old = self.state.previous, self.state.previous_old
        failure = {"version": version, "reason": reason, "at": utc_timestamp(time.time())}
        self.save(phase="rolling_back", target=version, last_failure=failure)
        crashpoint("rb-started")
        if previous is not None and self.app.is_complete(previous):
            self.app.set_link("CURRENT", previous)
        else:
            previous = None
            self.app.remove_link("CURRENT")  # first install failed: no app rather than a broken one
        crashpoint("rb-current-linked")
        if previous_old is not None and previous_old != previous and self.app.is_complete(previous_old):
            self.app.set_link("OLD", previous_old)
        else:
            self.app.remove_link("OLD")
        self.app.remove_link("NEW")
        crashpoint("rb-old-linked")
        if self.settings.restart_cmd and previous is not None:
            env = {"OTAD_VERSION": previous, "OTAD_RELEASE_DIR": str(self.app.release_dir(previous)), "OTAD_APP_DIR": str(self.app.root)}
            outcome = runner.run(self.settings.restart_cmd, self.settings.selftest_timeout, env=env)
            if not outcome.ok:
                log.error("restart after rolling back to %s failed: %s", previous, _reason("", outcome))
        crashpoint("rb-restarted")
        attempts = dict(self.state.attempts)
        attempts[version] = attempts.get(version, 0) + 1
        blacklist = list(self.state.blacklist)
        newly_blacklisted = attempts[version] >= self.settings.max_attempts and version not in blacklist
        if newly_blacklisted:
            blacklist.append(version)
        self.save(phase="idle", target=None, committed=previous, attempts=attempts, blacklist=blacklist,
                  probation_until=None, previous=None, previous_old=None)
        crashpoint("rb-recorded")
        self.gc()
        self.outbox.add("rolled_back", version, reason)
        log.warning("rolled back app %s to %s: %s", version, previous or "nothing (no earlier release)", reason)
        if newly_blacklisted:
            self.outbox.add("blacklisted", version, f"{attempts[version]} failed attempts")
            log.warning("blacklisted app %s after %d failed attempts", version, attempts[version])

    # -- probation ------------------------------------------------------------------------
    def check_probation(self) -> bool:
        """Run HEALTH_CMD once; True while still on probation."""
        if self.state.phase != "probation":
            return False
        version = self.state.target or self.state.committed
        if self.state.probation_until is not None and time.time() >= self.state.probation_until:
            with self.lock:
                self.save(phase="idle", target=None, probation_until=None, previous=None, previous_old=None)
            log.info("app %s passed probation", version)
            return False
        self.step = "probation"
        outcome = runner.run(self.settings.health_cmd, self.settings.selftest_timeout, cwd=self.settings.app_dir)
        if not outcome.ok:
            with self.lock:
                self.state = self.store.load()
                self.rollback(version, _reason("health check failed during probation", outcome))
            return False
        return True

    # -- recovery -------------------------------------------------------------------------
    def recover(self) -> None:
        """Finish or undo whatever a crash interrupted; called once at start-up."""
        self.app.ensure()
        with self.lock:
            self.state = self.store.load()
            phase, target = self.state.phase, self.state.target
            if phase == "unpacking" or (phase == "activating" and self.app.target("CURRENT") != target):
                log.warning("recovery: abandoning the interrupted install of app %s", target)
                if self.state.previous_old is not None and phase == "activating":
                    self.app.set_link("OLD", self.state.previous_old)
                self.app.remove_link("NEW")
                self.save(phase="idle", target=None, previous=None, previous_old=None)
            elif phase in ("activating", "selftest"):
                self.rollback(target, "interrupted before the self-test passed (otad-robot restarted)")
            elif phase == "rolling_back":
                self.rollback(target, (self.state.last_failure or {}).get("reason", "rollback interrupted"))
            self._check_current()
            self.app.remove_link("NEW")
            self.gc()

    def _check_current(self) -> None:
        current = self.app.target("CURRENT")
        if current is not None and not self.app.is_complete(current):
            old = self.app.target("OLD")
            log.error("recovery: CURRENT points at an incomplete release %s; falling back to %s", current, old)
            if old is not None and self.app.is_complete(old):
                self.app.set_link("CURRENT", old)
                self.save(committed=old)
            else:
                self.app.remove_link("CURRENT")
                self.save(committed=None)
        elif current is not None and self.state.committed != current and self.state.phase == "idle":
            self.save(committed=current)  # adopted: e.g. an image shipped with a release

    def gc(self) -> None:
        keep = {v for v in (self.app.target("CURRENT"), self.app.target("OLD")) if v}
        if self.state.phase == "probation" and self.state.previous:
            keep.add(self.state.previous)
        removed = self.app.gc(keep)
        if removed:
            log.info("removed old releases: %s", ", ".join(removed))


def _reason(what: str, outcome: runner.Outcome) -> str:
    text = f"{what} ({outcome.reason})" if what else outcome.reason
    return f"{text}: {outcome.tail}" if outcome.tail else text
