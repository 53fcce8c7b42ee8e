"""The readiness gate (otad/orchestration/readiness.py): what one READY_CMD run means.

No robot runs READY_CMD yet (issue 16's foundation; the robot daemon is wired
in a later change), so these tests call `interpret` with exit codes, stdout
bytes and times, as the robot will after running the command.
"""
from __future__ import annotations

import pytest

from otad.orchestration.readiness import MAX_RETRY_AFTER_S, ReadySettings, interpret

SETTINGS = ReadySettings(retry_s=60, max_defer_s=3600)


def test_exit_0_is_ready_and_ends_a_deferral():
    ready = interpret(0, b"docked, battery 80%\n", 1000, 500, SETTINGS)
    assert (ready.state, ready.proceed, ready.retry_at, ready.deferred_since) == ("ready", True, None, None)
    assert ready.reason == "ready by READY_CMD (docked, battery 80%)"


def test_exit_75_defers_for_what_the_command_asks():
    later = interpret(75, b"carrying a load\nretry-after=600\n", 1000, None, SETTINGS)
    assert (later.state, later.proceed, later.retry_at, later.deferred_since) == ("deferred", False, 1600, 1000)
    assert later.reason == "deferred by READY_CMD: retry-after=600 (carrying a load)"


def test_exit_75_without_retry_after_uses_ready_retry_s():
    later = interpret(75, b"", 1000, None, SETTINGS)
    assert later.retry_at == 1060 and later.reason == "deferred by READY_CMD: retry in 60s (READY_RETRY_S)"


@pytest.mark.parametrize("stdout, delay, shown", [
    (b"retry-after=999999999999\n", MAX_RETRY_AFTER_S, "retry-after=86400 (asked 999999999999s, bounded to 1..86400)"),
    (b"retry-after=0", 1, "retry-after=1 (asked 0s, bounded to 1..86400)"),
    (b"retry-after=-5\n", 60, "retry in 60s"), (b"retry-after=abc\n", 60, "retry in 60s"),
    (b"retry-after=1e9\n", 60, "retry in 60s"), (b"retry-after=9999999999999\n", 60, "retry in 60s"),
    (b"  retry-after=30 \r\n", 30, "retry-after=30"), (b"x retry-after=30\n", 60, "retry in 60s"),
    (b"retry-after=\xd9\xa3\n", 60, "retry in 60s"),  # an Arabic-Indic 3 is not a number here
])
def test_retry_after_is_read_strictly_and_bounded(stdout, delay, shown):
    later = interpret(75, stdout, 0, None, SETTINGS)
    assert later.retry_at == delay and shown in later.reason and "\n" not in later.reason


def test_only_the_head_of_stdout_is_read_and_a_cut_line_is_not_believed():
    flood = b"x" * 5000 + b"\nretry-after=10\n"
    assert interpret(75, flood, 0, None, SETTINGS).retry_at == 60
    cut = b"y" * 4080 + b"\nretry-after=18000\n"  # the 4096-byte head ends inside "18000"
    assert interpret(75, cut, 0, None, SETTINGS).retry_at == 60
    said = interpret(75, b"\x1b[31mbusy\x00\n", 0, None, SETTINGS).reason
    assert said.endswith("(?[31mbusy?)") and len(interpret(75, b"z" * 300, 0, None, SETTINGS).reason) < 200


@pytest.mark.parametrize("code, shown", [(1, "exit 1"), (2, "exit 2"), (-9, "signal 9"), (None, "no exit (timed out)"),
                                         (74, "exit 74"), (76, "exit 76")])
def test_any_other_exit_is_an_error_retried_after_ready_retry_s(code, shown):
    error = interpret(code, b"retry-after=5\n", 1000, None, SETTINGS)
    assert (error.state, error.proceed, error.retry_at) == ("error", False, 1060)
    assert error.reason == f"READY_CMD failed ({shown}), retry in 60s"


def test_deferred_longer_than_ready_max_defer_s_is_reported_but_not_forced():
    still = interpret(75, b"", 1000 + 3599, 1000, SETTINGS)
    assert not still.deferred_too_long
    late = interpret(75, b"", 1000 + 3600, 1000, SETTINGS)
    assert late.deferred_too_long and not late.proceed and late.deferred_since == 1000
    assert late.reason.endswith("; deferred_too_long (3600s, READY_MAX_DEFER_S=3600)")
    assert interpret(1, b"", 1000 + 4000, 1000, SETTINGS).deferred_too_long  # errors keep it from updating too


def test_force_after_s_makes_a_deferred_robot_proceed_only_when_the_plan_says_so():
    forcing = ReadySettings(retry_s=60, max_defer_s=3600, force_after_s=7200)
    assert not interpret(75, b"", 1000 + 7199, 1000, forcing).proceed
    forced = interpret(75, b"busy\nretry-after=600\n", 1000 + 7200, 1000, forcing)
    assert (forced.state, forced.proceed, forced.deferred_too_long) == ("forced", True, True)
    assert forced.reason == "forced after 7200s deferred (plan force_after_s=7200); last: deferred by READY_CMD: retry-after=600 (busy)"


def test_a_deferral_that_starts_in_the_future_restarts_now():
    """A clock stepped back must not make the deferral negative (or forced early)."""
    later = interpret(75, b"", 1000, 5000, ReadySettings(force_after_s=10))
    assert later.deferred_since == 1000 and not later.proceed
