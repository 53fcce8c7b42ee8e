"""Power cuts under the real otad-dashboard and `otad-release publish` (tests/powercut_dashboard.py), a short seeded run.

`python tests/powercut_dashboard.py` runs the long one (POWER_CUTS=200); POWER_SEED replays a run.
"""
from __future__ import annotations

import os

import pytest

from lazyfs import LazyMount
from powercut_dashboard import DashboardPowerCuts

WHY_NOT = LazyMount.available()


@pytest.mark.skipif(WHY_NOT is not None, reason=f"power-loss layer unavailable: {WHY_NOT}")
def test_dashboard_survives_power_cuts_during_publishes_and_ingest(site):
    seed = int(os.environ.get("POWER_SEED", "20261203"))
    cuts = int(os.environ.get("POWER_CUTS", "8"))
    report = DashboardPowerCuts(site, seed).run(cuts)
    print(report.summary())
    assert report.violations == [], report.summary()
    assert report.cuts == cuts
    # The cuts landed inside publishes, not only between them.
    assert sum(n for phase, n in report.phases.items() if phase not in ("after publish", "ingest only")) >= 1, report.phases


@pytest.mark.skipif(WHY_NOT is not None, reason=f"power-loss layer unavailable: {WHY_NOT}")
def test_a_cut_as_publish_renames_the_manifest_in_leaves_a_served_pair(site):
    """Replays seed 1 with every cut on the step where publish renames manifest.json in.

    Before the fix: manifest.json.bundle (the new release's, durable) was renamed in before
    manifest.json, whose rename the cut undid; the disk held the old manifest with the new
    bundle, the dashboard restarted serving no release at all (404) and gateways got nothing.
    """
    report = DashboardPowerCuts(site, 1, targets=(("moved", "manifest.json"),)).run(3)
    assert report.violations == [], report.summary()
    assert report.phases["renamed manifest.json"] >= 1, report.phases
