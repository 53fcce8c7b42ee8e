"""Power cuts under the real otad-gateway (tests/powercut_gateway.py), a short seeded run.

`python tests/powercut_gateway.py` runs the long one (POWER_CUTS=200); POWER_SEED replays a run.
"""
from __future__ import annotations

import os

import pytest

from lazyfs import LazyMount
from powercut_gateway import GatewayPowerCuts
from test_telemetry import tele  # noqa: F401 (a fixture: the dashboard with the robots' and gateway's tokens)

WHY_NOT = LazyMount.available()


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
