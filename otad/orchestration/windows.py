"""Maintenance windows: when a site may take robots out of service, in its local wall time.

A spec is one or more windows separated by `;`, each `DAYS HH:MM-HH:MM`
(grammar in docs/formats.md), e.g. `Mon-Fri 22:00-05:00; Sat,Sun 00:00-24:00`.
DAYS name the day a window opens; an end at or before the start is on the next
day, so `Mon-Fri 22:00-05:00` runs from Monday 22:00 to Tuesday 05:00, ..., and
from Friday 22:00 to Saturday 05:00. Windows that overlap or touch are one.

Wall time is the site's (`SITE_TIMEZONE`, an IANA name read by zoneinfo), and a
window follows it across DST changes: 22:00-05:00 is 22:00-05:00 on the clock,
so in real time it lasts an hour less on the night the clocks go forward and an
hour more on the night they go back. Two rules make the odd hours definite:
- a boundary in the skipped hour (clocks go forward) is the moment the clocks
  jump: a window opening at 02:30 on 2026-03-29 in Europe/Berlin opens at
  03:00 CEST. It is shorter that day, never lost; a window wholly inside the
  skipped hour does not happen that day (there is no such local time);
- a boundary in the repeated hour (clocks go back) is its first occurrence, so
  every window happens once a day: 01:00-02:30 on 2026-10-25 in Berlin closes
  at 02:30 CEST and is not open again when the clock reads 02:00 CET.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from otad.orchestration import OrchestrationError, Verdict

MAX_SPEC_CHARS = 512
MAX_WINDOWS = 16
MAX_TZ_CHARS = 64
DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
HORIZON_DAYS = 15  # how far ahead closes_at/next_open look: two weeks and a day for DST
_WINDOW = re.compile(r"([A-Za-z,-]+) +([0-9]{2}):([0-9]{2})-([0-9]{2}):([0-9]{2})")
_TZ = re.compile(r"[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+){0,3}")
_NOT_ZONES = frozenset({"localtime", "posixrules", "Factory", "posix", "right"})
_PRINTABLE = re.compile(r"[\x20-\x7e]*")


class WindowError(OrchestrationError):
    """A maintenance-window spec or site time zone is malformed."""


@dataclass(frozen=True)
class Window:
    days: frozenset[int]  # weekdays it opens on, Monday = 0
    start: int  # minutes after local midnight, 0..1439
    end: int  # minutes after local midnight, 0..1440; <= start: on the next day


@dataclass(frozen=True)
class Schedule:
    windows: tuple[Window, ...]
    text: str  # the spec as given, for reasons and logs


def parse_windows(text: str) -> Schedule:
    """The schedule a spec names, or WindowError with the first thing wrong in it."""
    if not isinstance(text, str):
        raise WindowError("window spec is not text")
    if len(text) > MAX_SPEC_CHARS:
        raise WindowError(f"window spec is longer than {MAX_SPEC_CHARS} characters")
    if not _PRINTABLE.fullmatch(text):
        raise WindowError("window spec holds a character that is not printable ASCII")
    parts = [part.strip() for part in text.split(";")]
    if len(parts) > MAX_WINDOWS:
        raise WindowError(f"window spec has more than {MAX_WINDOWS} windows")
    if any(not part for part in parts):
        raise WindowError("window spec has an empty window (a ';' with nothing beside it)")
    return Schedule(tuple(_window(part) for part in parts), text)


def _window(text: str) -> Window:
    match = _WINDOW.fullmatch(text)
    if match is None:
        raise WindowError(f"window {text[:40]!r} is not DAYS HH:MM-HH:MM (e.g. Mon-Fri 22:00-05:00)")
    days = _days(match[1])
    start = _minutes(match[2], match[3], text, allow_24=False)
    end = _minutes(match[4], match[5], text, allow_24=True)
    if start == end % 1440 and end != 1440:
        raise WindowError(f"window {text[:40]!r} opens and closes at the same time (a whole day is 00:00-24:00)")
    return Window(days, start, end)


def _days(text: str) -> frozenset[int]:
    seen: list[int] = []
    for item in text.split(","):
        first, dash, last = item.partition("-")
        if dash:
            a, b = _day(first), _day(last)
            if a == b:
                raise WindowError(f"day range {item[:20]!r} starts and ends on the same day")
            seen.extend((a + n) % 7 for n in range((b - a) % 7 + 1))  # Fri-Mon wraps over the weekend
        else:
            seen.append(_day(first))
    for day in set(seen):
        if seen.count(day) > 1:
            raise WindowError(f"window days {text[:40]!r} name {DAYS[day]} twice")
    return frozenset(seen)


def _day(name: str) -> int:
    if name not in DAYS:
        raise WindowError(f"{name[:20]!r} is not a day (Mon Tue Wed Thu Fri Sat Sun)")
    return DAYS.index(name)


def _minutes(hours: str, minutes: str, text: str, allow_24: bool) -> int:
    h, m = int(hours), int(minutes)
    if allow_24 and (h, m) == (24, 0):
        return 1440
    if h > 23 or m > 59:
        limit = "00:00 to 24:00" if allow_24 else "00:00 to 23:59"
        raise WindowError(f"window {text[:40]!r} has a time {hours}:{minutes} outside {limit}")
    return h * 60 + m


def parse_timezone(name: str) -> ZoneInfo:
    """SITE_TIMEZONE: an IANA name (Europe/Berlin, UTC), never a path."""
    if not isinstance(name, str) or len(name) > MAX_TZ_CHARS or not _TZ.fullmatch(name) or ".." in name:
        raise WindowError(f"time zone {str(name)[:40]!r} is not an IANA name like Europe/Berlin")
    # Files in the tz folder that are not site zones: the host's own zone (so the site's
    # windows would move with the gateway's setup), and leap-second zones (right/ counts
    # TAI seconds: every boundary 27 s off Unix time).
    if name in _NOT_ZONES or name.startswith(("right/", "posix/")):
        raise WindowError(f"time zone {name!r} is not a site's IANA zone (use e.g. Europe/Berlin)")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise WindowError(f"time zone {name!r} is not known to this system's tz database") from None


# -- evaluation -----------------------------------------------------------------------------
def _schedule(spec: str | Schedule) -> Schedule:
    return spec if isinstance(spec, Schedule) else parse_windows(spec)


def _zone(tz: str | ZoneInfo) -> ZoneInfo:
    return tz if isinstance(tz, ZoneInfo) else parse_timezone(tz)


def local_epoch(day: date, minute: int, tz: ZoneInfo) -> int:
    """The instant the site's clock reads `minute` on `day`, by the module's DST rules."""
    day, minute = (day + timedelta(days=1), 0) if minute == 1440 else (day, minute)
    naive = datetime(day.year, day.month, day.day, minute // 60, minute % 60)
    first = int(naive.replace(tzinfo=tz, fold=0).timestamp())  # repeated hour: its first occurrence
    if datetime.fromtimestamp(first, tz).replace(tzinfo=None) == naive:
        return first
    # Skipped hour: fold=0 read it with the old offset (past the jump), fold=1 with the new
    # one (before it); the jump lies between. Find its first second.
    low, high = int(naive.replace(tzinfo=tz, fold=1).timestamp()), first
    low, high = min(low, high), max(low, high)
    after = _offset(high, tz)
    while high - low > 1:
        middle = (low + high) // 2
        if _offset(middle, tz) == after:
            high = middle
        else:
            low = middle
    return high


def _offset(epoch: int, tz: ZoneInfo) -> timedelta | None:
    return datetime.fromtimestamp(epoch, tz).utcoffset()


def intervals(spec: str | Schedule, tz: str | ZoneInfo, now: float, days_ahead: int = HORIZON_DAYS) -> list[tuple[int, int]]:
    """Open periods [open, close) in epoch seconds, merged, from two local days before `now`
    to `days_ahead` after: every period that can hold `now` or follow it."""
    schedule, zone = _schedule(spec), _zone(tz)
    today = datetime.fromtimestamp(now, zone).date()
    found: list[tuple[int, int]] = []
    for offset in range(-2, days_ahead + 1):
        day = today + timedelta(days=offset)
        for window in schedule.windows:
            if day.weekday() not in window.days:
                continue
            opens = local_epoch(day, window.start, zone)
            closes = local_epoch(day + timedelta(days=1) if window.end <= window.start else day, window.end, zone)
            if closes > opens:  # empty only when wholly inside a skipped hour
                found.append((opens, closes))
    merged: list[tuple[int, int]] = []
    for opens, closes in sorted(found):
        if merged and opens <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], closes))
        else:
            merged.append((opens, closes))
    return merged


def _around(spec: str | Schedule, tz: str | ZoneInfo, now: float) -> tuple[tuple[int, int] | None, list[tuple[int, int]]]:
    periods = intervals(spec, tz, now)
    current = next(((o, c) for o, c in periods if o <= now < c), None)
    return current, periods


def is_open(spec: str | Schedule, tz: str | ZoneInfo, now: float) -> bool:
    """Is the site inside a maintenance window at `now` (epoch seconds)?"""
    return _around(spec, tz, now)[0] is not None


def closes_at(spec: str | Schedule, tz: str | ZoneInfo, now: float) -> int | None:
    """When the window open at `now` closes; None when it does not close within two weeks
    (the spec covers every minute: always open). Closed at `now` also gives None: ask
    is_open first, or use fits, which tells the two apart."""
    current, periods = _around(spec, tz, now)
    if current is None or current[1] >= periods[-1][1]:
        return None
    return current[1]


def next_open(spec: str | Schedule, tz: str | ZoneInfo, now: float) -> float | None:
    """The first moment at or after `now` inside a window (`now` itself when open); None
    only if no window opens within two weeks, which no valid spec allows."""
    current, periods = _around(spec, tz, now)
    if current is not None:
        return now
    return next((float(o) for o, _ in periods if o > now), None)


def fits(spec: str | Schedule, tz: str | ZoneInfo, now: float, expected_install_s: float) -> Verdict:
    """May a lease start at `now`? Only inside a window, and only if an install of
    `expected_install_s` (the site's median or a configured estimate) ends before it closes."""
    schedule, zone = _schedule(spec), _zone(tz)
    if not 0 <= expected_install_s < float("inf"):  # NaN too: it would compare as "fits"
        raise WindowError(f"expected install time {expected_install_s!r} is not a number of seconds >= 0")
    current, periods = _around(schedule, zone, now)
    if current is None:
        opens = next((o for o, _ in periods if o > now), None)
        when = f"until {_clock(opens, now, zone)}" if opens is not None else "for the next two weeks"
        return Verdict(False, f"outside window {schedule.text!r} {when} ({zone.key})")
    if current[1] >= periods[-1][1]:
        return Verdict(True, f"inside window {schedule.text!r} (always open)")
    closes = current[1]
    if now + expected_install_s > closes:
        return Verdict(False, f"an install of about {expected_install_s:.0f}s would not end before window "
                              f"{schedule.text!r} closes at {_clock(closes, now, zone)} ({zone.key})")
    return Verdict(True, f"inside window {schedule.text!r} until {_clock(closes, now, zone)} ({zone.key})")


def clock_text(epoch: float, now: float, tz: str | ZoneInfo) -> str:
    """How the site's clock names `epoch` seen from `now`: `22:00`, `Sat 05:00` or a date (reasons)."""
    return _clock(epoch, now, _zone(tz))


def _clock(epoch: float, now: float, zone: ZoneInfo) -> str:
    """`22:00` the same local day, `Sat 05:00` another day, `2026-03-29 03:00` beyond a week."""
    at, today = datetime.fromtimestamp(epoch, zone), datetime.fromtimestamp(now, zone)
    if at.date() == today.date():
        return at.strftime("%H:%M")
    if at - today < timedelta(days=6):
        return f"{DAYS[at.weekday()]} {at.strftime('%H:%M')}"
    return at.strftime("%Y-%m-%d %H:%M")

