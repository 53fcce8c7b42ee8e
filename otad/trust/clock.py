"""The wall clock that manifest expiry is judged against.

Expiry needs real time (a monotonic clock cannot be compared with a signed
timestamp). `OTAD_TEST_CLOCK_SKEW` (seconds, may be negative) shifts it: a
test-only hook, like OTAD_TEST_CRASH_AT, so tests can play a robot ten days
into a WAN outage without waiting ten days. Never set it in production.
"""
from __future__ import annotations

import os
import time


def now() -> float:
    skew = os.environ.get("OTAD_TEST_CLOCK_SKEW")
    return time.time() + (float(skew) if skew else 0.0)
