"""Site orchestration (issue 16): maintenance windows, the concurrency budget, install leases
and the robot's readiness gate, as pure functions.

Like otad/rollout/, nothing here does I/O or reads a clock: the gateway and the
robot pass texts, bytes, counts and `now`, so both reach the same decision from
the same inputs and a test can drive any state, including DST changes. The
gateway (otad/gateway/orchestrator.py) and the robot (otad/robot/orchestrate.py)
do the I/O; the dashboard reads the gateway's snapshot with snapshot.py.

Bad configuration text (a window spec, SITE_MAX_CONCURRENT, ROBOT_GROUPS) raises
`OrchestrationError`, a ConfigError that is also a ValueError so otad/config.py's
settings can use the parsers directly; unreadable lease-table bytes raise
`leases.LeaseTableError`. Every message is one line.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from otad.errors import ConfigError

# Robot and group ids: the telemetry's ids (records.py), one safe path component.
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class OrchestrationError(ConfigError, ValueError):
    """A window spec, concurrency budget or robot-group text is malformed (bad input, one line)."""


@dataclass(frozen=True)
class Verdict:
    """A yes/no decision with the one-line reason a journal line or `otadctl status` shows."""

    ok: bool
    reason: str
