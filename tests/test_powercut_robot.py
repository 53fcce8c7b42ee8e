"""Power cuts under the real otad-robot (tests/powercut_robot.py), a short seeded run.

`make soak-power` runs the long one (POWER_CUTS=200); POWER_SEED replays a run.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from harness import wait_until
from lazyfs import LazyMount
from otad.robot.crashpoints import ROLLBACK_STEPS
from powercut_robot import RobotPowerCuts
from powerloop import stopped

WHY_NOT = LazyMount.available()
# The loops test otad's own write order, not the libraries': they run once, in the first pass
# of make check, and not again on the bookworm pins (tests/test_lazyfs.py runs there too).
pytestmark = pytest.mark.slow


@pytest.fixture
def site(site):
    site.gw = site.gateway().start()
    return site


@pytest.mark.skipif(WHY_NOT is not None, reason=f"power-loss layer unavailable: {WHY_NOT}")
def test_robot_survives_power_cuts_during_installs_and_rollbacks(site):
    """Seed 5 cuts at named steps of an install and of a rollback, and in the rollbacks its recoveries do."""
    seed = int(os.environ.get("POWER_SEED", "5"))
    report = RobotPowerCuts(site, seed).run(int(os.environ.get("POWER_CUTS", "8")))
    print(report.summary())
    assert report.violations == [], report.summary()
    assert report.cuts == int(os.environ.get("POWER_CUTS", "8"))
    # The cuts landed inside installs, not only between them, and (the default seed) at rollback steps.
    assert sum(n for phase, n in report.phases.items() if phase != "idle") >= 1, report.phases
    if "POWER_SEED" not in os.environ:
        assert any(step.partition(" ")[0] in ROLLBACK_STEPS for step in report.steps), report.steps
        assert any(step.endswith("(in recovery)") for step in report.steps), report.steps


@pytest.mark.skipif(WHY_NOT is not None, reason=f"power-loss layer unavailable: {WHY_NOT}")
def test_robot_that_created_its_own_folders_keeps_them_across_a_power_cut(site):
    """A robot started on an empty disk (no packaged /var/lib/otad folders) installs 1.0.0, then the power goes.

    Before otad.fsutil.make_dirs (mkdir, then an fsync of the parent, for each folder made) the
    cut took STATE_DIR and APP_DIR with it: CURRENT and state.json (blacklist, anti-rollback floor).
    """
    report = RobotPowerCuts(site, 1, fresh_dirs=True).run(1)
    assert report.violations == [], report.summary()


FROZEN_CHILD = """
import os, sys, threading, time
from otad.robot import crashpoints

go = threading.Event()

def worker():
    go.wait()
    crashpoints.crashpoint("current-linked")
    out = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
    for n in range(1, 1_000_000):  # nothing of this may run once the step froze the daemon
        os.pwrite(out, b"%d\\n" % n, 0)

# The daemon's two threads on one busy CPU: the idle main thread, woken to take a signal
# for the whole process, gets its turn only after the running worker (SCHED_IDLE).
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
threading.Thread(target=worker).start()
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
go.set()
time.sleep(60)
"""


def test_a_freeze_at_a_step_stops_the_thread_that_reached_it(tmp_path):
    """The power-cut loop cuts while the robot is frozen at a step, and checks that the disk holds
    what the robot had saved by then. Freezing with kill(getpid(), SIGSTOP) queued the stop to the
    whole process: the kernel woke the idle main thread to take it, and the worker that reached the
    step ran on meanwhile (seed 14200, cut 47: frozen at current-linked, the worker had already
    unlinked NEW, and the loop reported that unlink, never fsynced, as a lost write).

    A daemon cannot be made to lose that race on demand, so this runs the real hook in a child
    with the daemon's two threads: once every thread is stopped, the worker has run nothing past the step.
    """
    freeze = tmp_path / "steps"
    freeze.mkdir()
    (freeze / "current-linked").touch()
    ran = tmp_path / "ran-on"
    child = subprocess.Popen([sys.executable, "-c", FROZEN_CHILD, str(ran)],
                             env={**os.environ, "OTAD_TEST_POWERCUT_DIR": str(freeze)})
    try:
        wait_until(lambda: stopped(child.pid), 30, "the child frozen at current-linked")
        assert not (freeze / "current-linked").exists()  # consumed: a restart runs on
        assert not ran.exists(), f"the worker ran on after the step: {ran.read_text().strip()} writes"
    finally:
        child.kill()
        child.wait(10)
