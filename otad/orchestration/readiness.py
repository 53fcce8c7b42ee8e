"""The robot's readiness gate: what one run of READY_CMD means, before it asks for a lease.

The robot's own fleet software knows whether it is docked, idle or charging;
READY_CMD asks it, in the Mender state-script convention:
- exit 0: ready, ask for a lease now;
- exit 75 (EX_TEMPFAIL): not now. Retry after READY_RETRY_S, or after what the
  command prints on a stdout line `retry-after=SECONDS` (bounded to
  MAX_RETRY_AFTER_S, so a hostile or buggy command cannot park the robot for a
  year or spin it every millisecond);
- any other exit, a signal, or no exit (timed out): an error, retried after
  READY_RETRY_S.
Both "not now" and errors keep the robot from updating, so both count as
deferral time: a robot deferred since longer than READY_MAX_DEFER_S is reported
`deferred_too_long` (still never forced), and only a plan's `force_after_s`
makes it proceed anyway once deferred that long. Ready ends the deferral.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

EX_TEMPFAIL = 75
MAX_RETRY_AFTER_S = 86_400
MIN_RETRY_S = 1
MAX_STDOUT_READ = 4096  # only the head of stdout is read: the command's own words, not a log dump
MAX_SAID = 80
_RETRY_AFTER = re.compile(rb"retry-after=([0-9]{1,12})")


@dataclass(frozen=True)
class ReadySettings:
    retry_s: int = 60  # READY_RETRY_S
    max_defer_s: int = 86_400  # READY_MAX_DEFER_S
    force_after_s: int | None = None  # the plan's force_after_s; None: never forced


@dataclass(frozen=True)
class Readiness:
    state: str  # "ready", "deferred", "error" or "forced" (deferred, but the plan forces it now)
    proceed: bool  # ask for a lease now (ready or forced)
    retry_at: float | None  # when to run READY_CMD again (None when proceeding)
    deferred_since: float | None  # carry into the next call; None once ready
    deferred_too_long: bool
    reason: str  # one line: what `otadctl status` and the journal show


def interpret(exit_code: int | None, stdout: bytes, now: float, deferred_since: float | None,
              settings: ReadySettings) -> Readiness:
    """What this run of READY_CMD means. `exit_code`: its exit status, negative for a signal
    (subprocess's convention), None when it did not finish. `deferred_since`: the first
    deferral of the current streak, from the previous call (None: not deferred)."""
    said = _said(stdout)
    if exit_code == 0:
        return Readiness("ready", True, None, None, False, f"ready by READY_CMD{said}")
    since = now if deferred_since is None or deferred_since > now else deferred_since
    waited = now - since
    too_long = waited >= settings.max_defer_s
    if exit_code == EX_TEMPFAIL:
        delay, asked = _retry_after(stdout, settings.retry_s)
        what = f"deferred by READY_CMD: {asked}"
        state = "deferred"
    else:
        delay = max(MIN_RETRY_S, min(settings.retry_s, MAX_RETRY_AFTER_S))
        code = "no exit (timed out)" if exit_code is None else f"signal {-exit_code}" if exit_code < 0 else f"exit {exit_code}"
        what = f"READY_CMD failed ({code}), retry in {delay}s"
        state = "error"
    if settings.force_after_s is not None and waited >= settings.force_after_s:
        return Readiness("forced", True, None, since, too_long,
                         f"forced after {waited:.0f}s deferred (plan force_after_s={settings.force_after_s}); last: {what}{said}")
    late = f"; deferred_too_long ({waited:.0f}s, READY_MAX_DEFER_S={settings.max_defer_s})" if too_long else ""
    return Readiness(state, False, now + delay, since, too_long, f"{what}{said}{late}")


def _retry_after(stdout: bytes, default_s: int) -> tuple[int, str]:
    """The delay a `retry-after=SECONDS` line asks for, bounded; READY_RETRY_S without one."""
    fallback = max(MIN_RETRY_S, min(default_s, MAX_RETRY_AFTER_S))
    for line in _head(stdout):
        match = _RETRY_AFTER.fullmatch(line.strip())
        if match:
            asked = int(match[1])
            delay = max(MIN_RETRY_S, min(asked, MAX_RETRY_AFTER_S))
            bounded = "" if delay == asked else f" (asked {asked}s, bounded to {MIN_RETRY_S}..{MAX_RETRY_AFTER_S})"
            return delay, f"retry-after={delay}{bounded}"
    return fallback, f"retry in {fallback}s (READY_RETRY_S)"


def _said(stdout: bytes) -> str:
    """The command's first other line, printable ASCII only, short: why, in its own words."""
    for line in _head(stdout):
        text = line.strip()
        if text and not _RETRY_AFTER.fullmatch(text):
            clean = "".join(chr(b) if 0x20 <= b < 0x7F else "?" for b in text[:MAX_SAID])
            return f" ({clean})"
    return ""


def _head(stdout: bytes) -> list[bytes]:
    """Whole lines of the first MAX_STDOUT_READ bytes (a cut line could read retry-after=1 for =1800)."""
    head = stdout[:MAX_STDOUT_READ]
    if len(stdout) > MAX_STDOUT_READ:
        head = head[:head.rfind(b"\n") + 1]
    return head.splitlines()
