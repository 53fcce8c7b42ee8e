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
