"""Power cuts under the real telemetry-agent (tests/powercut_agent.py), a short seeded run.

`python tests/powercut_agent.py` runs the long one (POWER_CUTS=200); POWER_SEED replays a run.
"""
from __future__ import annotations

import os
import sqlite3

import pytest

from lazyfs import LazyMount
from powercut_agent import AgentPowerCuts, start_agent_site

WHY_NOT = LazyMount.available()
# The loops test otad's own write order, not the libraries': they run once, in the first pass
# of make check, and not again on the bookworm pins (tests/test_lazyfs.py runs there too).
pytestmark = pytest.mark.slow


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


RECORD = {"robot_id": "robot", "boot_id": "boot-1", "ts": "2026-12-03T10:00:00Z", "type": "metric",
          "cpu": 1.0, "mem": 2.0, "version": "", "health": "ok"}


@pytest.mark.skipif(WHY_NOT is not None, reason=f"power-loss layer unavailable: {WHY_NOT}")
@pytest.mark.parametrize("operation", ["add", "delete", "drain_outbox"])
def test_a_spool_write_on_a_failing_disk_reports_the_disk_error(tmp_path, operation):
    """The disk fails under the spool (the layer's crash(): every operation EIO, as in the power-cut loop).

    SQLite rolls the transaction back by itself on an I/O error; the spool's own ROLLBACK then
    failed with "cannot rollback - no transaction is active", and that, not "disk I/O error",
    was what the agent logged (seen in the loop's logs at the cut). Driven through the real
    Spool on the real layer: through the daemon, which of its two threads meets the failed
    disk first, and so which line comes first, is a race.
    """
    from otad.agent.spool import Spool
    from otad.robot.outbox import Outbox
    from powerloop import kill_users

    mount = LazyMount(tmp_path / "disk", tmp_path / "mnt").mount()
    spool = None
    try:
        spool = Spool(tmp_path / "mnt" / "agent" / "spool.db", 1 << 20)
        for _ in range(3):
            spool.add(RECORD)
        outbox = Outbox(tmp_path / "robot")  # on a sound disk: only the spool's fails
        outbox.add("installed", "1.0.0")
        mount.crash()
        with pytest.raises(sqlite3.OperationalError) as failed:
            if operation == "add":
                spool.add(RECORD)
            elif operation == "delete":
                spool.delete([1, 2])
            else:
                spool.drain_outbox(outbox, "robot", "boot-1")
        assert "disk I/O error" in str(failed.value), str(failed.value)
    finally:
        if spool is not None:
            spool.close()  # our own descriptors on the mount, which kill_users leaves alone
        kill_users(tmp_path / "mnt")
        mount.unmount()
