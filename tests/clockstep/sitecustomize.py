"""Test-only: step the wall clock of a daemon started with this folder on PYTHONPATH.

`OTAD_TEST_WALL_STEP_FILE` names a file holding seconds (may be negative) that
`time.time()` is shifted by, read at every call, so a test can step a running
daemon's wall clock forward or back the way an NTP correction or an operator's
`date -s` does, without touching the machine's clock (other tests share it).
Monotonic clocks are left alone, as a real step leaves them.
"""
import os
import time

_path = os.environ.get("OTAD_TEST_WALL_STEP_FILE")
if _path:
    _real_time = time.time

    def _stepped_time() -> float:
        try:
            with open(_path) as handle:
                step = float(handle.read().strip() or 0)
        except (OSError, ValueError):
            step = 0.0
        return _real_time() + step

    time.time = _stepped_time
