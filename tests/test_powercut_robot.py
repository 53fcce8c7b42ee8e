"""Power cuts under the real otad-robot (tests/powercut_robot.py), a short seeded run.

`make soak-power` runs the long one (POWER_CUTS=200); POWER_SEED replays a run.
"""
from __future__ import annotations

import os

import pytest

from lazyfs import LazyMount
from otad.robot.crashpoints import ROLLBACK_STEPS
from powercut_robot import RobotPowerCuts

WHY_NOT = LazyMount.available()


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
