"""Install, activate, self-test, commit or roll back: the robot's state machine.

Every step is preceded by persisting the phase (StateStore.save, atomic), and
every link change is a rename(2), so `recover()` can finish or undo whatever a
crash interrupted. The rule it restores: CURRENT resolves to a complete,
committed release (or, on a robot that never committed one, does not exist),
and OLD, if it exists, is another complete release.

Only failures the release caused count towards MAX_ATTEMPTS: a self-test or
health check that failed or timed out (an archive the unpacker refuses is a
rejection, held back by the worker). An install cut short by a crash, a power
cut or the OOM killer is rolled back at the next start but counted apart
(`interrupted`), so a few kills cannot blacklist a good release.

While it runs, the installer shows progress through `beat` (the worker's
heartbeat): for every piece of the archive the unpacker reads, and every second
a restart, self-test or health command is still running within its deadline.
A hung disk or a wedged child stops the beats, and the watchdog does the rest.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from otad.errors import OtadError
from otad.robot import runner
from otad.robot.crashpoints import crashpoint
from otad.robot.layout import AppDir
from otad.robot.outbox import Outbox
from otad.robot.settings import RobotSettings
from otad.robot.state import StateStore
from otad.robot.unpack import unpack_release
from otad.trust.manifest import Manifest, utc_timestamp
from otad.trust.rollback import decide_install, next_floor

log = logging.getLogger("otad.robot")

# Installs of one version cut short by crashes (not failed by the release) before it is
# blacklisted anyway: a release whose restart reboots the robot must not loop for ever.
MAX_INTERRUPTED = 10


class Installer:
    def __init__(self, settings: RobotSettings, store: StateStore, outbox: Outbox,
                 beat: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.app = AppDir(settings.app_dir)
        self.store = store
        self.lock = store.lock
        self.outbox = outbox
        self.beat = beat or (lambda: None)
        self.state = store.load()
        self.step = ""  # for STATUS=
        self._probation_mark: float | None = None  # time.monotonic() of the last passed health check

    def save(self, **changes) -> None:
        """Change these fields only, on top of what is on disk (otadctl may have changed others)."""
        self.state = self.store.update(**changes)

    # -- install ------------------------------------------------------------------------
    def install(self, manifest: Manifest, artifact: Path, downgrade: bool = False, rollout: dict | None = None,
                plan_downgrade: bool = False) -> bool:
        """Unpack a verified artifact and activate it. True if it was committed.

        `downgrade`: an authorised downgrade (the signed manifest allows it), which
        lowers the anti-rollback floor to this version once committed.
        `rollout`: the plan that assigned this install (RobotState.rollout), or None.
        `plan_downgrade`: an aborted plan sends this robot back to the version it came
        from (worker.py checked that it is exactly that version).
        """
        version = manifest.version
        with self.lock:
            self.state = self.store.load()  # otadctl may have changed it since the last poll
            decision = decide_install(version, self.app.target("CURRENT"), self.state.highest_committed, self.state.blacklist,
                                      manifest.allow_downgrade or plan_downgrade, self.settings.allow_downgrade)
            if not decision.install:
                log.info("not installing app %s: %s", version, decision.reason)
                return False
            self.step = "unpacking"
            self.save(phase="unpacking", target=version, rollout=rollout)
            self.app.remove_release(version)  # leftovers of an abandoned attempt
            try:
                unpack_release(artifact, self.app.release_dir(version), version,
                               self.settings.max_unpacked_bytes, self.settings.max_files,
                               progress=lambda read: self._unpacking(read, manifest.size))
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

    def _unpacking(self, read: int, size: int) -> None:
        # Called for every block the unpacker reads: the archive advancing is the proof of progress.
        self.step = f"unpacking ({100 * read // size if size else 0}%)"
        self.beat()

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
            outcome = runner.run(self.settings.restart_cmd, self.settings.selftest_timeout, env=env, alive=self.beat)
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
        outcome = runner.run(command, self.settings.selftest_timeout, cwd=release.resolve(), env=env, alive=self.beat)
        return None if outcome.ok else _reason("self-test failed", outcome)

    def _commit(self, version: str, downgrade: bool = False) -> None:
        # Probation needs something to roll back to; a robot's first release stays either way.
        probation = self.settings.probation_s > 0 and bool(self.settings.health_cmd) and self.state.previous is not None
        if probation:
            # CURRENT is the new release (so it is the floor meanwhile), but the highest
            # committed version, the attempt counts and OLD's fate wait for probation to pass.
            self.save(phase="probation", committed=version, target=version, downgrade=downgrade,
                      probation_s=float(self.settings.probation_s), probation_done=0.0)
            self._probation_mark = time.monotonic()
        else:
            self.save(**self._settled(self.state, version, downgrade))
        crashpoint("committed")
        tag = self.rollout_tag(version)
        self.outbox.add("installed", version, rollout=tag)
        if tag is not None and not probation:
            self.outbox.add("committed", version, rollout=tag)
        log.info("installed app %s%s", version, f"; on probation for {self.settings.probation_s}s" if probation else "")
        self.gc()
        crashpoint("gc-done")

    def rollout_tag(self, version: str | None) -> dict | None:
        """{"rollout_id", "phase"} for the events of `version`, when a plan assigned its install."""
        rollout = self.state.rollout
        if not rollout or rollout.get("version") != version:
            return None
        return {"rollout_id": rollout["rollout_id"], "phase": rollout["phase"]}

    @staticmethod
    def _settled(state, version: str, downgrade: bool) -> dict:
        """The state changes that make `version` for good: it passed its self-test and any probation."""
        return dict(
            phase="idle", committed=version, target=None, previous=None, previous_old=None,
            # The anti-rollback floor rises in the same atomic write.
            highest_committed=next_floor(state.highest_committed, version, downgrade),
            attempts={v: n for v, n in state.attempts.items() if v != version},
            interrupted={v: n for v, n in state.interrupted.items() if v != version},
            downgrade=False, probation_s=None, probation_done=0.0,
        )

    # -- rollback -------------------------------------------------------------------------
    def rollback(self, version: str, reason: str, counted: bool = True) -> None:
        """Back to the release that was CURRENT before `version` was activated.

        `counted`: the release failed (its self-test, its health check). False: the
        install was cut short from outside (a crash), which is counted apart.
        """
        self.step = "rolling back"
        previous, previous_old = self.state.previous, self.state.previous_old
        tag = self.rollout_tag(version)
        failure = {"version": version, "reason": reason, "at": utc_timestamp(time.time()), "counted": counted}
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
            outcome = runner.run(self.settings.restart_cmd, self.settings.selftest_timeout, env=env, alive=self.beat)
            if not outcome.ok:
                log.error("restart after rolling back to %s failed: %s", previous, _reason("", outcome))
        crashpoint("rb-restarted")
        attempts, interrupted = dict(self.state.attempts), dict(self.state.interrupted)
        counts, limit, what = (attempts, self.settings.max_attempts, "failed attempts") if counted else \
            (interrupted, MAX_INTERRUPTED, "interrupted installs")
        counts[version] = counts.get(version, 0) + 1
        blacklist = list(self.state.blacklist)
        newly_blacklisted = counts[version] >= limit and version not in blacklist
        if newly_blacklisted:
            blacklist.append(version)
        self.save(phase="idle", target=None, committed=previous, attempts=attempts, interrupted=interrupted,
                  blacklist=blacklist, previous=None, previous_old=None, downgrade=False, probation_s=None,
                  probation_done=0.0)
        crashpoint("rb-recorded")
        self.gc()
        self.outbox.add("rolled_back", version, reason, rollout=tag)
        log.warning("rolled back app %s to %s: %s%s", version, previous or "nothing (no earlier release)", reason,
                    "" if counted else f" (not a failure of the release; interrupted {counts[version]} times)")
        if newly_blacklisted:
            self.outbox.add("blacklisted", version, f"{counts[version]} {what}", rollout=tag)
            log.warning("blacklisted app %s after %d %s", version, counts[version], what)

    # -- probation ------------------------------------------------------------------------
    def check_probation(self) -> bool:
        """Run HEALTH_CMD once; True while still on probation.

        Probation is served in seconds of passed health checks, measured on the
        monotonic clock and saved at every check: wall-clock steps change nothing,
        and a restart resumes it (the interval the restart interrupted is not counted).
        """
        if self.state.phase != "probation":  # only this daemon enters or leaves probation
            return False
        self.state = self.store.load()  # otadctl may have changed other fields since the last check
        version = self.state.target or self.state.committed
        self.step = "probation"
        outcome = runner.run(self.settings.health_cmd, self.settings.selftest_timeout, cwd=self.settings.app_dir,
                             alive=self.beat)
        if not outcome.ok:
            with self.lock:
                self.state = self.store.load()
                self.rollback(version, _reason("health check failed during probation", outcome))
            return False
        now = time.monotonic()
        served = 0.0 if self._probation_mark is None else now - self._probation_mark
        self._probation_mark = now
        with self.lock:
            self.state = self.store.load()
            if self.state.phase != "probation":
                return False
            done = self.state.probation_done + served
            if done < (self.state.probation_s or 0):
                self.save(probation_done=done)
                return True
            self.save(**self._settled(self.state, version, self.state.downgrade))
            self.gc()
            if (tag := self.rollout_tag(version)) is not None:
                self.outbox.add("committed", version, rollout=tag)
        log.info("app %s passed probation", version)
        return False

    # -- recovery -------------------------------------------------------------------------
    def recover(self) -> None:
        """Finish or undo whatever a crash interrupted; called once at start-up."""
        self.app.ensure()
        with self.lock:
            self.state = self.store.load()
            phase, target = self.state.phase, self.state.target
            if phase == "unpacking" or (phase == "activating" and self.app.target("CURRENT") != target):
                log.warning("recovery: abandoning the interrupted install of app %s", target)
                if phase == "activating":
                    self._restore_old(self.state.previous_old)
                self.app.remove_link("NEW")
                self.save(phase="idle", target=None, previous=None, previous_old=None)
            elif phase in ("activating", "selftest"):
                self.rollback(target, "interrupted before the self-test passed (otad-robot restarted)", counted=False)
            elif phase == "rolling_back":
                failure = self.state.last_failure or {}
                self.rollback(target, failure.get("reason", "rollback interrupted"), counted=failure.get("counted", True))
            self._check_current()
            self._check_old()
            self.app.remove_link("NEW")
            self.gc()

    def _restore_old(self, previous_old: str | None) -> None:
        """OLD back to what it was before the activation (absent on a robot's first upgrade)."""
        if previous_old is not None and self.app.is_complete(previous_old):
            self.app.set_link("OLD", previous_old)
        else:
            self.app.remove_link("OLD")

    def _check_old(self) -> None:
        # OLD is what `otadctl rollback` goes to: never CURRENT itself, never an incomplete tree.
        old, current = self.app.target("OLD"), self.app.target("CURRENT")
        if old is not None and (old == current or not self.app.is_complete(old)):
            log.warning("recovery: removing OLD (app %s), which %s", old,
                        "is CURRENT" if old == current else "is not a complete release")
            self.app.remove_link("OLD")

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
