"""Power cuts under the real otad-gateway (tests/powercut_gateway.py), a short seeded run.

`python tests/powercut_gateway.py` runs the long one (POWER_CUTS=200); POWER_SEED replays a run.
"""
from __future__ import annotations

import os
import random

import pytest

from fleet import wait_for_version
from lazyfs import LazyMount
from otad.fsutil import fsync_dir
from powercut_gateway import GatewayPowerCuts
from powerloop import PowerLayer, Report
from test_telemetry import tele  # noqa: F401 (a fixture: the dashboard with the robots' and gateway's tokens)

WHY_NOT = LazyMount.available()
# The loops test otad's own write order, not the libraries': they run once, in the first pass
# of make check, and not again on the bookworm pins (tests/test_lazyfs.py runs there too).
pytestmark = pytest.mark.slow


@pytest.mark.skipif(WHY_NOT is not None, reason=f"power-loss layer unavailable: {WHY_NOT}")
def test_gateway_cache_and_telemetry_buffer_survive_power_cuts(tele):  # noqa: F811
    seed = int(os.environ.get("POWER_SEED", "20261203"))
    cuts = int(os.environ.get("POWER_CUTS", "6"))
    report = GatewayPowerCuts(tele, seed).run(cuts)
    print(report.summary())
    assert report.violations == [], report.summary()
    assert report.cuts == cuts
    # The cuts landed inside inserts, forwarding or a release download, not only between them.
    assert sum(n for phase, n in report.phases.items() if phase != "idle") >= 1, report.phases


@pytest.mark.skipif(WHY_NOT is not None, reason=f"power-loss layer unavailable: {WHY_NOT}")
def test_a_genuine_release_republished_after_a_tampered_one_is_served_after_a_power_cut(tele):  # noqa: F811
    """The dashboard offered 1.1.0 with a tampered artifact; the gateway downloaded it, refused it and
    deleted the part; then the power went. The operator republishes the genuine 1.1.0 (same name, same size).

    Before the fix the deletion was not durable (no fsync of partial/): the tampered part came back whole,
    the gateway took it as a download finished before the cut, refused the genuine release ("sha256 is ...")
    and held it back for 10 minutes.
    """
    mnt = tele.root / "gw-fs"
    layer = PowerLayer(tele.root / "gw-disk", mnt, random.Random(1), Report("gateway", 1))
    layer.mount()
    try:
        (mnt / "state").mkdir()
        fsync_dir(mnt)
        tele.release("1.0.0")
        gw = tele.gateway(STATE_DIR=mnt / "state").start()
        gw.pin_port()
        wait_for_version(gw.url, "1.0.0")
        out = tele.build("1.1.0", size=1024 * 1024)
        tele.publish_tampered(out)
        gw.wait_for_log(r"rejected app 1\.1\.0: .*sha256 is", timeout=60)
        layer.cut(gw)
        (tele.ota / "app-v1.1.0.tar.gz").unlink()  # the operator removes the tampered file and publishes again
        tele.publish(out)
        layer.mount()
        gw.start()
        wait_for_version(gw.url, "1.1.0", timeout=30)
        assert "rejected app 1.1.0" not in gw.new_log()
    finally:
        layer.close()


@pytest.mark.skipif(WHY_NOT is not None, reason=f"power-loss layer unavailable: {WHY_NOT}")
def test_a_buffer_write_on_a_failing_disk_reports_the_disk_error_and_keeps_its_counts(tmp_path):
    """The disk fails under the telemetry buffer (the layer's crash(): every operation EIO).

    SQLite rolls the transaction back by itself on an I/O error; the buffer's own ROLLBACK
    then failed with "cannot rollback - no transaction is active", which replaced the disk
    error in the gateway's log and skipped undoing the in-memory `refused` count, so the
    count /status shows drifted above what the file holds. Driven through the real
    TelemetryBuffer on the real layer (through the daemon, which thread meets the failed
    disk first is a race).
    """
    import sqlite3

    from fleet import metric
    from otad.gateway.buffer import TelemetryBuffer
    from powerloop import kill_users

    mount = LazyMount(tmp_path / "disk", tmp_path / "mnt").mount()
    buffer = TelemetryBuffer(tmp_path / "mnt" / "telemetry.db", 1 << 24)
    buffer.start()
    try:
        assert buffer.append([metric("r1", 5)])[0] == 1
        assert buffer.append([metric("r1", 3)])[2] == 1  # a seq that went backwards: refused, counted
        refused = buffer.refused
        mount.crash()
        with pytest.raises(sqlite3.OperationalError) as failed:
            buffer.append([metric("r1", 2), metric("r1", 6)])  # one refused, one new: the commit fails
        assert "disk I/O error" in str(failed.value), str(failed.value)
        assert buffer.refused == refused
    finally:
        buffer.close()
        kill_users(tmp_path / "mnt")
        mount.unmount()
