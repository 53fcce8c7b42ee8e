"""Power cuts under otad-robot: its STATE_DIR and APP_DIR on the power-loss layer (tests/lazyfs.py).

Each cut: a new release is published, the robot installs it, and the layer loses every
write not yet durable (crash()), every process using the mount is SIGKILLed, the layer is
unmounted and mounted afresh over the same backing folder, and the robot restarts. The
seed chooses, for every cut, where it lands:

- at a random time (a third of the cuts): 0 to 2.5 s after the download starts, anywhere
  in download, verify, unpack, activation, self-test, rollback or probation; a quarter of
  these releases fail their self-test;
- in the download (one cut in ten): a release of 4 to 16 MiB, cut once a random share of
  it is received (the cut lands while the download, or its verification, runs);
- at a named step (the rest): every step of an install (crashpoints.INSTALL_STEPS, a good
  release) or of a rollback (ROLLBACK_STEPS, a release whose self-test fails), taken in
  turn from a seeded shuffle so that every step is hit. The robot freezes itself there
  (OTAD_TEST_POWERCUT_DIR, see otad/robot/crashpoints.py) and the cut lands at that instant.

After every cut, on the disk as the cut left it and again after the robot's recovery, the
invariants of issue 14:

- CURRENT resolves to a complete, committed, verified release;
- the blacklist and the anti-rollback floor (highest_committed) never move backwards, and a
  robot frozen at a step finds, after the cut, the state and links it had saved before it;
- a release blacklisted before a cut is never activated or committed after it;
- no release is half-unpacked under a `.ok` marker (every file equal to the built app);
- at the end, without cuts, the robot converges to the newest release that passes.

Each mount draws, from the seed, whether it tears writes (--torn) or loses them whole. The
summary gives the phases at the cut (state.json's phase; for `idle`, the robot's log and its
download tell downloading and verifying apart) and the steps cut at.
Run: `python tests/powercut_robot.py` (POWER_CUTS, POWER_SEED; POWER_SECONDS bounds the
time, and the summary says how many cuts ran); tests/test_powercut_robot.py runs a short one.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import wait_until  # noqa: E402
from invariants import committed_and_sound, current_problem, current_version, robot_state  # noqa: E402
from powerloop import PowerLayer, Report, soak_main, stopped, tree  # noqa: E402
from otad.fsutil import fsync_dir  # noqa: E402
from otad.robot.crashpoints import INSTALL_STEPS, ROLLBACK_STEPS  # noqa: E402
from otad.semver import parse_version  # noqa: E402

MIB = 1024 * 1024
LINKS = ("CURRENT", "OLD", "NEW")
VERSION = r"([0-9][^\s;:]*)"  # a version in a log line


@dataclass
class Plan:
    """Where one cut lands, drawn from the seed before the release is built."""
    mode: str  # "time", "download" or "step"
    passes: bool  # the release's self-test passes
    size: int  # bytes of random data in the app
    delay: float = 0.0  # time: seconds after "downloading app"
    share: float = 0.0  # download: the share of the artifact received
    step: str = ""  # step: the crashpoint to freeze at
    recovery: tuple[str | None, ...] = ()  # the steps of the recovery's rollback to cut at, if it rolls back


class RobotPowerCuts:
    """One robot on the layer, against the site's real dashboard and gateway."""

    def __init__(self, site, seed: int, fresh_dirs: bool = False) -> None:
        self.site = site
        self.fresh_dirs = fresh_dirs
        self.seed = seed
        self.rng = random.Random(seed)  # the plans: the same seed, the same releases and cuts
        self.report = Report("robot", seed)
        self.disk = site.root / "robot-disk"
        self.mnt = site.root / "robot-fs"
        self.layer = PowerLayer(self.disk, self.mnt, random.Random(f"{seed} layer"), self.report)
        self.freeze = site.root / "robot-powercut-steps"  # OTAD_TEST_POWERCUT_DIR: off the layer
        self.freeze.mkdir(exist_ok=True)
        self.deck: list[str] = []
        self.sources: dict[str, dict[str, str]] = {}  # version -> file -> sha256 of the built app
        self.manifests: dict[str, dict] = {}
        self.last_state: dict | None = None
        self.blacklisted: set[str] = set()  # on the disk after some cut: never to be installed again
        self.blacklisted_at_start: set[str] = set()
        self.daemon = None
        self.committed = False
        self.verbose = False
        self.deadline: float | None = None

    # -- the plan -----------------------------------------------------------------------

    def plan(self) -> Plan:
        # Every draw is made whatever the timing does, so that a seed replays the same plans.
        recovery = tuple(self.rng.choice(ROLLBACK_STEPS) if self.rng.random() < 0.5 else None for _ in range(2))
        draw = self.rng.random()
        if draw < 1 / 3:
            return Plan("time", self.rng.random() > 0.25, self.rng.choice([16, 64, 256]) * 1024,
                        delay=self.rng.uniform(0.0, 2.5), recovery=recovery)
        if draw < 1 / 3 + 0.1:
            return Plan("download", self.rng.random() > 0.25, self.rng.choice([4, 8, 16]) * MIB,
                        share=self.rng.random(), recovery=recovery)
        if not self.deck:
            self.deck = list(INSTALL_STEPS + ROLLBACK_STEPS)
            self.rng.shuffle(self.deck)
        step = self.deck.pop()
        return Plan("step", step not in ROLLBACK_STEPS, self.rng.choice([16, 64, 256]) * 1024, step=step,
                    recovery=recovery)

    def release(self, version: str, passes: bool, size: int) -> None:
        out = self.site.build(version, size=size, selftest="sleep 0.3" if passes else "sleep 0.3; exit 1")
        self.manifests[version] = self.site.publish(out)
        app = self.site.root / f"app-{version}"
        self.sources[version] = {name: hashlib.sha256(data).hexdigest() for name, data in tree(app).items()}
        shutil.rmtree(app)  # published: only the digests are needed, and big releases add up
        shutil.rmtree(out)

    # -- invariants ---------------------------------------------------------------------

    def disk_problems(self, cut: int, frozen: dict | None) -> list[str]:
        """The invariants on the backing folder itself, as the cut left it.

        `frozen`: what the live mount showed while the robot was frozen at a step (its
        state.json and links): every save and rename it had finished must be on the disk.
        """
        app, state_dir = self.disk / "app", self.disk / "state"
        problems = []
        # Once the robot logged a committed install, CURRENT and state.json must be on the disk.
        problem = current_problem(app, allow_none=not self.committed)
        if problem:
            problems.append(problem)
        releases = app / "releases"
        for marker in sorted(releases.glob("*.ok")) if releases.is_dir() else []:
            version = marker.name[:-3]
            if version not in self.sources:
                continue
            found = tree(releases / version) if (releases / version).is_dir() else {}
            found = {name: hashlib.sha256(data).hexdigest() for name, data in found.items()}
            want = self.sources[version]
            if found != want:
                missing = sorted(set(want) - set(found))
                short = sorted(name for name in set(want) & set(found) if found[name] != want[name])
                problems.append(f"{version}.ok but releases/{version} is incomplete: missing {missing}, differing {short}")
        try:
            state = json.loads((state_dir / "state.json").read_text())
        except FileNotFoundError:
            state = None
            if self.committed:
                problems.append("state.json is gone")
        except ValueError as exc:
            state = None
            problems.append(f"state.json unreadable: {exc}")
        if state is not None and self.last_state is not None:
            lost = set(self.last_state["blacklist"]) - set(state["blacklist"])
            if lost:
                problems.append(f"blacklist moved backwards: lost {sorted(lost)}")
            before, now = self.last_state.get("highest_committed"), state.get("highest_committed")
            if before and (not now or parse_version(now) < parse_version(before)):
                problems.append(f"anti-rollback floor moved backwards: {before} -> {now}")
        if frozen is not None:
            if frozen["state"] is not None and state != frozen["state"]:
                changed = sorted(k for k in set(frozen["state"]) | set(state or {})
                                 if (state or {}).get(k) != frozen["state"].get(k))
                problems.append(f"state.json saved before the step is not on the disk: {changed} differ")
            links = self.links(app)
            if links != frozen["links"]:
                problems.append(f"links set before the step are not on the disk: {frozen['links']} became {links}")
        if state is not None:
            self.last_state = state
            self.blacklisted |= set(state["blacklist"])
        return [f"seed {self.seed}, cut {cut}: {p}" for p in problems]

    @staticmethod
    def links(app: Path) -> dict[str, str | None]:
        return {name: os.readlink(app / name) if os.path.lexists(app / name) else None for name in LINKS}

    def frozen_view(self) -> dict:
        try:
            state = robot_state(self.mnt / "state")
        except (OSError, ValueError):
            state = None
        return {"state": state, "links": self.links(self.mnt / "app")}

    def installed_blacklisted(self, robot) -> str | None:
        """A release activated or committed after it was blacklisted: by the robot's log (across
        every start), or on the disk as the last cut left it (the log line may not be written yet)."""
        logged: set[str] = set()
        for match in re.finditer(rf"blacklisted app {VERSION}|(?:activated|installed) app {VERSION}", robot.log()):
            if match[1]:
                logged.add(match[1])
            elif match[2] in logged:
                return f"{match[2]} was blacklisted, and the robot logged {match[0]!r} after it"
        for match in re.finditer(rf"(?:activated|installed) app {VERSION}", robot.new_log()):
            if match[1] in self.blacklisted_at_start:
                return f"{match[1]} was blacklisted before the cut, and the robot logged {match[0]!r} after it"
        return None

    # -- the run ------------------------------------------------------------------------

    def robot(self):
        return self.site.robot(self.site.gw.url, STATE_DIR=self.mnt / "state", APP_DIR=self.mnt / "app",
                               MAX_ATTEMPTS=2, PROBATION_S=1, HEALTH_CMD="true", HEALTH_INTERVAL=1,
                               env={"OTAD_TEST_POWERCUT_DIR": str(self.freeze)})

    def recovered_problem(self, failing: set[str]) -> str | None:
        """The invariants on the live mount, after the robot's recovery.

        An open racing the robot's rename over the same name can fail with ENOENT on this
        layer (libfuse2's path-based API), where ext4 opens the old file: such a read is
        retried, and only a name missing three times in a row counts.
        """
        for attempt in range(3):
            try:
                problem = committed_and_sound(self.mnt / "app", self.mnt / "state")
                committed = robot_state(self.mnt / "state")["committed"]
                break
            except FileNotFoundError as exc:
                problem = f"state unreadable: {exc}"
                time.sleep(0.2)
            except (OSError, ValueError) as exc:
                return f"state unreadable: {exc}"
        else:
            return problem
        if not problem and committed in failing:
            return f"committed {committed}, whose self-test fails"
        if not problem and committed in self.blacklisted:
            return f"committed {committed}, blacklisted before a cut"
        return problem

    def phase(self) -> str:
        try:
            return json.loads((self.mnt / "state" / "state.json").read_text())["phase"]
        except (OSError, ValueError, KeyError):
            return "unknown"

    def where(self, robot) -> str:
        """The phase at the cut: state.json's, and for `idle`, the download or its verification."""
        phase = self.phase()
        if phase != "idle":
            return phase
        log = robot.new_log()
        started = list(re.finditer(r"downloading app (\S+) ", log))
        if not started:
            return "idle"
        version, since = started[-1][1], log[started[-1].end():]
        if re.search(r"installed app|passed probation|rolled back app|rejected app|not installing app|interrupted|unreachable|refused", since):
            return "idle"
        if f"verified app {version} " in since:
            return "verifying"  # verified, not yet unpacking
        manifest = self.manifests.get(version)
        part = self.mnt / "state" / "downloads" / f"{manifest['artifact']}.part" if manifest else None
        try:
            done = part is not None and part.stat().st_size >= manifest["size"]
        except OSError:
            done = False
        return "verifying" if done else "downloading"

    def run(self, cuts: int, seconds: float | None = None) -> Report:
        """`cuts` power cuts, fewer if `seconds` run out first (the report says how many)."""
        self.deadline = None if seconds is None else time.monotonic() + seconds
        try:
            return self._run(cuts)
        finally:
            if self.daemon is not None:
                self.daemon.kill9()
            self.layer.close()

    def _run(self, cuts: int) -> Report:
        self.layer.mount()
        if not self.fresh_dirs:
            # STATE_DIR and APP_DIR exist, durably, before the first start, as the Debian
            # package lays them out (POWER_FRESH_DIRS=1: the robot creates them itself).
            for name in ("state", "app"):
                (self.mnt / name).mkdir()
            fsync_dir(self.mnt)
        self.release("1.0.0", True, 64 * 1024)
        robot = self.daemon = self.robot().start(wait_listening=False)
        robot.wait_for_log("installed app 1.0.0", timeout=60)
        wait_until(lambda: self.phase() == "idle", 30, "1.0.0 out of probation")
        self.committed = True
        failing: set[str] = set()
        number = 0
        while self.report.cuts < cuts and not self.report.violations:
            if self.deadline is not None and time.monotonic() > self.deadline:
                print(f"time budget spent after {self.report.cuts} cuts", flush=True)
                break
            number += 1
            self.cycle(robot, number, failing, cuts)
        if not self.report.violations:
            self.converge(robot)
        robot.kill9()
        return self.report

    def cycle(self, robot, number: int, failing: set[str], cuts: int) -> None:
        """Publish release 1.<number>.0, cut as planned, then perhaps again in the recovery's rollback."""
        version, plan = f"1.{number}.0", self.plan()
        failing |= set() if plan.passes else {version}
        frozen, problem = self.aim(robot, version, plan)
        at = f"step {plan.step}" if plan.mode == "step" else \
            f"{plan.share:.0%} of {plan.size // MIB} MiB" if plan.mode == "download" else f"{plan.delay:.2f}s"
        what = f"{version} ({'good' if plan.passes else 'failing'}), {plan.mode} cut at {at}"
        problems = self.cut(robot, what, plan.step, frozen, problem)
        # A cut during an activation, a self-test or a rollback leaves a rollback for the
        # recovery to do: half the time (twice at most), the next cut lands at a step of that one.
        for step in plan.recovery:
            if problems or self.report.cuts >= cuts or step is None or not self.recovery_rolls_back():
                break
            (self.freeze / step).touch()
            self.power_on(robot)
            try:
                wait_until(lambda: stopped(robot.proc.pid) or robot.proc.poll() is not None, 60,
                           f"the robot to freeze at step {step} of its recovery")
                problem = None if robot.proc.poll() is None else f"the robot exited ({robot.proc.returncode}) in recovery"
            except AssertionError as exc:
                problem = str(exc)
            frozen = None if problem else self.frozen_view()
            problems = self.cut(robot, f"{version}, again at step {step} of the recovery's rollback",
                                f"{step} (in recovery)", frozen, problem)
        if not problems:
            problems = self.restart(robot, failing)
        if problems:
            self.report.violations += problems

    def cut(self, robot, what: str, step: str, frozen: dict | None, problem: str | None) -> list[str]:
        """The power cut, now: count it, cut, check the disk as the cut left it."""
        phase = self.where(robot)
        if step.startswith("rb-") and self.phase() == "idle":
            phase = "rolling_back"  # at rb-recorded: the rollback is recorded, not finished (gc, event, log)
        self.report.phases[phase] += 1
        problem = problem or self.installed_blacklisted(robot)
        if frozen is not None:
            self.report.steps[step] += 1
        self.layer.cut(robot)
        self.report.cuts += 1
        for armed in self.freeze.iterdir():
            armed.unlink()  # a step not reached (a missed stop is reported as a problem)
        problems = [f"seed {self.seed}, cut {self.report.cuts}: {problem}"] if problem else []
        problems += self.disk_problems(self.report.cuts, frozen)
        if self.verbose:
            print(f"cut {self.report.cuts}: {what}, phase {phase}, {'torn' if self.layer.lazy.torn else 'whole'} "
                  f"writes lost, {'VIOLATION' if problems else 'invariants hold'}", flush=True)
        return problems

    def power_on(self, robot) -> None:
        self.layer.mount()
        self.blacklisted_at_start = set(self.blacklisted)
        robot.start(wait_listening=False)

    def restart(self, robot, failing: set[str]) -> list[str]:
        """Power on, wait for the recovery, check the invariants on the live mount."""
        self.power_on(robot)
        robot.wait_for_log("recovered: CURRENT is app", timeout=60)
        after = self.recovered_problem(failing)
        return [f"seed {self.seed}, cut {self.report.cuts}, after recovery: {after}"] if after else []

    def recovery_rolls_back(self) -> bool:
        """Whether the next start's recovery rolls back (Installer.recover), from the disk the cut left."""
        state = self.last_state or {}
        phase, target = state.get("phase"), state.get("target")
        return phase in ("selftest", "rolling_back") or \
            (phase == "activating" and target is not None and current_version(self.disk / "app") == target)

    def aim(self, robot, version: str, plan: Plan) -> tuple[dict | None, str | None]:
        """Publish `version` and wait for the instant of the cut; (the frozen view, a problem)."""
        if plan.mode == "step":
            (self.freeze / plan.step).touch()
        self.release(version, plan.passes, plan.size)
        if plan.mode == "step":
            try:
                wait_until(lambda: stopped(robot.proc.pid) or robot.proc.poll() is not None, 90,
                           f"the robot to freeze at step {plan.step}")
            except AssertionError as exc:
                return None, str(exc)
            if robot.proc.poll() is not None:
                return None, f"the robot exited ({robot.proc.returncode}) before step {plan.step}"
            return self.frozen_view(), None
        robot.wait_for_log(rf"downloading app {version}\b|not installing app {version}\b", timeout=60)
        if plan.mode == "download":
            part = self.mnt / "state" / "downloads" / f"{self.manifests[version]['artifact']}.part"
            wait_until(lambda: self._received(part) >= plan.share * plan.size or robot.proc.poll() is not None
                       or f"verified app {version} " in robot.new_log(), 60, f"{plan.share:.0%} of {version} received")
            return None, None
        try:  # the cut lands anywhere from the download to the end of probation
            robot.proc.wait(plan.delay)
        except subprocess.TimeoutExpired:
            pass
        return None, None

    @staticmethod
    def _received(part: Path) -> int:
        try:
            return part.stat().st_size
        except OSError:
            return 0

    def converge(self, robot) -> None:
        # The gateway offers only its newest release, so a good release cut during its
        # self-test and superseded before the retry is never installed (docs/reliability.md):
        # the robot must converge to a last, good release, published without a cut.
        newest_good = f"1.{self.report.cuts + 1}.0"
        self.release(newest_good, True, 64 * 1024)
        try:
            wait_until(lambda: current_version(self.mnt / "app") == newest_good and self.phase() == "idle",
                       90, f"convergence to {newest_good}")
        except AssertionError as exc:
            self.report.violations.append(f"seed {self.seed}: {exc} (CURRENT is {current_version(self.mnt / 'app')})")
        problem = self.recovered_problem(set()) or self.installed_blacklisted(robot)
        if problem:
            self.report.violations.append(f"seed {self.seed}, at the end: {problem}")


def start_robot_loop(site, seed: int) -> RobotPowerCuts:
    site.start_dashboard()
    site.gw = site.gateway().start()
    return RobotPowerCuts(site, seed, fresh_dirs=os.environ.get("POWER_FRESH_DIRS") == "1")


if __name__ == "__main__":
    sys.exit(soak_main("robot", start_robot_loop))
