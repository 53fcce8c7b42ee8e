"""Power cuts under the real otad-dashboard and `otad-release publish` (tests/powercut_dashboard.py), a short seeded run.

`python tests/powercut_dashboard.py` runs the long one (POWER_CUTS=200); POWER_SEED replays a run.
"""
from __future__ import annotations

import os

import pytest

from conftest import otad_release
from fleet import Site
from lazyfs import LazyMount
from powercut_dashboard import DashboardPowerCuts
from powerloop import kill_users

WHY_NOT = LazyMount.available()
# The loops test otad's own write order, not the libraries': they run once, in the first pass
# of make check, and not again on the bookworm pins (tests/test_lazyfs.py runs there too).
pytestmark = pytest.mark.slow


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


@pytest.mark.skipif(WHY_NOT is not None, reason=f"power-loss layer unavailable: {WHY_NOT}")
def test_an_ota_dir_that_publish_made_survives_a_power_cut(tmp_path, keypair):
    """`otad-release publish --to` a folder that does not exist yet exits 0, then the power goes.

    Before the fix publish made the folder with mkdir and never fsynced its parent: the cut
    took OTA_DIR away with the release in it, though publish had reported success.
    """
    site = Site(tmp_path, *keypair)
    out = site.build("1.0.0")
    layer = LazyMount(tmp_path / "disk", tmp_path / "fs")
    layer.mount()
    try:
        result = otad_release("publish", "--from", str(out), "--to", str(tmp_path / "fs" / "srv" / "ota"))
        assert result.returncode == 0, result.stderr
        layer.crash()
    finally:
        kill_users(tmp_path / "fs")
        layer.unmount()
    verified = otad_release("verify", "--key", str(site.pub), "--manifest", str(tmp_path / "disk" / "srv" / "ota" / "manifest.json"))
    assert verified.returncode == 0, verified.stderr
    assert "verified app-v1.0.0.tar.gz" in verified.stdout


@pytest.mark.skipif(WHY_NOT is not None, reason=f"power-loss layer unavailable: {WHY_NOT}")
def test_an_ingest_on_a_failing_disk_reports_the_disk_error(tmp_path):
    """The disk fails under the dashboard's store (the layer's crash(): every operation EIO).

    SQLite rolls the transaction back by itself on an I/O error; the store's own ROLLBACK then
    failed with "cannot rollback - no transaction is active", and that, not "disk I/O error",
    was what the gateway's forwarder was answered and the dashboard logged. Driven through
    the real SqliteTelemetryStore on the real layer.
    """
    import sqlite3

    from fleet import metric
    from otad.dashboard.store import SqliteTelemetryStore

    mount = LazyMount(tmp_path / "disk", tmp_path / "mnt").mount()
    store = SqliteTelemetryStore(tmp_path / "mnt" / "telemetry.db")
    try:
        row = {"id": 1, "received": "2026-12-03T10:00:00Z", "record": metric("r1", 1)}
        assert store.ingest("gw", "ab01", 0, [row]) == 1
        mount.crash()
        with pytest.raises(sqlite3.OperationalError) as failed:
            store.ingest("gw", "ab01", 0, [{**row, "id": 2, "record": metric("r1", 2)}])
        assert "disk I/O error" in str(failed.value), str(failed.value)
    finally:
        store.close()
        kill_users(tmp_path / "mnt")
        mount.unmount()
