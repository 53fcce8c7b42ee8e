"""Power cuts under the real telemetry-agent (tests/powercut_agent.py), a short seeded run.

`python tests/powercut_agent.py` runs the long one (POWER_CUTS=200); POWER_SEED replays a run.
"""
from __future__ import annotations

import os

import pytest

from lazyfs import LazyMount
from powercut_agent import AgentPowerCuts, start_agent_site

WHY_NOT = LazyMount.available()


@pytest.fixture
def site(site):
    start_agent_site(site)
    return site


@pytest.mark.skipif(WHY_NOT is not None, reason=f"power-loss layer unavailable: {WHY_NOT}")
def test_agent_spool_and_outbox_survive_power_cuts_while_collecting_spooling_and_sending(site):
    seed = int(os.environ.get("POWER_SEED", "20261203"))
    cuts = int(os.environ.get("POWER_CUTS", "6"))
    report = AgentPowerCuts(site, seed).run(cuts)
    print(report.summary())
    assert report.violations == [], report.summary() + "\n" + "\n".join(report.violations)
    assert report.cuts == cuts


@pytest.mark.skipif(WHY_NOT is not None, reason=f"power-loss layer unavailable: {WHY_NOT}")
def test_agent_counter_survives_power_cuts_within_one_boot(site):
    """The machine's own boot id and clock go on across the cuts: one (robot, boot) key space.

    The spool's counter (last_seq, issued) must then come back from every cut at or above
    every seq the gateway acknowledged: a synchronous=NORMAL spool fails this within a few cuts.
    """
    report = AgentPowerCuts(site, 2, same_boot=True).run(4)
    assert report.violations == [], report.summary() + "\n" + "\n".join(report.violations)
    assert report.cuts == 4
