"""Maintenance windows (otad/orchestration/windows.py) and the window corpus, on the real module.

No daemon reads windows yet (issue 16's foundation; the gateway wires them in a
later change), and no daemon could be driven to a DST change on demand anyway:
these tests call the module with explicit epochs. Every epoch below is written
as a UTC instant (independent of the code under test); the comments give the
Berlin wall time. Europe/Berlin 2026: clocks go forward on 2026-03-29 at 01:00
UTC (02:00 CET -> 03:00 CEST) and back on 2026-10-25 at 01:00 UTC (03:00 CEST ->
02:00 CET).
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from otad.errors import ConfigError
from otad.orchestration.windows import (WindowError, closes_at, fits, intervals, is_open, next_open, parse_timezone,
                                        parse_windows)

CORPUS = Path(__file__).parent / "corpus"
CASES = json.loads((CORPUS / "window-cases.json").read_text())
BERLIN = "Europe/Berlin"


def utc(text: str) -> int:
    """'2026-03-29T01:00' read as UTC, as epoch seconds."""
    return int(datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp())


def test_explicit_epochs_are_what_the_comments_say():
    assert utc("2026-03-29T01:00") == 1774746000 and utc("2026-10-25T01:00") == 1792890000


def test_the_spec_forms_parse():
    schedule = parse_windows("Mon-Fri 22:00-05:00; Sat,Sun 00:00-24:00;Wed 12:00-12:30")
    assert [sorted(w.days) for w in schedule.windows] == [[0, 1, 2, 3, 4], [5, 6], [2]]
    assert [(w.start, w.end) for w in schedule.windows] == [(1320, 300), (0, 1440), (720, 750)]
    assert sorted(parse_windows("Fri-Mon 01:00-02:00").windows[0].days) == [0, 4, 5, 6]  # wraps over the weekend
    assert parse_windows("Sun 23:00-00:00").windows[0].end == 0  # ends at midnight, on Monday


def test_window_error_is_a_config_error_and_a_value_error():
    """So otad/config.py settings can use parse_windows as a field parser (it catches ValueError)."""
    with pytest.raises(ConfigError):
        parse_windows("Mon")
    with pytest.raises(ValueError):
        parse_windows("Mon")


def test_a_window_crossing_midnight_opens_on_its_days_and_closes_the_next_morning():
    spec = "Mon-Fri 22:00-05:00"
    # 2026-06-01 is a Monday; Berlin is UTC+2 (CEST).
    assert not is_open(spec, BERLIN, utc("2026-06-01T19:59"))  # Mon 21:59
    assert is_open(spec, BERLIN, utc("2026-06-01T20:00"))  # Mon 22:00
    assert closes_at(spec, BERLIN, utc("2026-06-01T20:00")) == utc("2026-06-02T03:00")  # Tue 05:00
    assert is_open(spec, BERLIN, utc("2026-06-06T02:59"))  # Sat 04:59: Friday's window
    assert not is_open(spec, BERLIN, utc("2026-06-06T03:00"))  # Sat 05:00
    assert not is_open(spec, BERLIN, utc("2026-06-06T20:30"))  # Sat 22:30: not a window day
    assert next_open(spec, BERLIN, utc("2026-06-06T03:00")) == utc("2026-06-08T20:00")  # Mon 22:00
    assert next_open(spec, BERLIN, utc("2026-06-01T21:00")) == utc("2026-06-01T21:00")  # open: now


def test_touching_windows_are_one_and_a_full_week_never_closes():
    weekend = "Sat,Sun 00:00-24:00"
    assert closes_at(weekend, BERLIN, utc("2026-06-06T21:59")) == utc("2026-06-07T22:00")  # Sat 23:59 -> Mon 00:00
    always = "Mon-Sun 00:00-24:00"
    assert closes_at(always, BERLIN, utc("2026-03-29T00:59")) is None
    assert fits(always, BERLIN, utc("2026-10-25T00:30"), 86400 * 30).ok


def test_spring_forward_the_window_follows_the_wall_clock():
    """Sat 22:00-05:00 over 2026-03-29: 22:00 CET to 05:00 CEST, six real hours, not seven."""
    spec = "Sat 22:00-05:00"
    assert intervals(spec, BERLIN, utc("2026-03-28T22:00"))[0] == (utc("2026-03-28T21:00"), utc("2026-03-29T03:00"))
    # 01:30 CET with a window to 03:30: two hours on the clock, one real hour (02:00-03:00 is skipped).
    late = "Sat 22:00-03:30"
    now = utc("2026-03-29T00:30")
    assert closes_at(late, BERLIN, now) == utc("2026-03-29T01:30")
    assert fits(late, BERLIN, now, 3600).ok
    verdict = fits(late, BERLIN, now, 5400)
    assert not verdict.ok and "would not end before window 'Sat 22:00-03:30' closes at 03:30 (Europe/Berlin)" in verdict.reason


def test_spring_forward_a_window_including_the_skipped_hour():
    spec = "Sun 01:30-03:30"  # 01:30 CET to 03:30 CEST: one real hour
    assert intervals(spec, BERLIN, utc("2026-03-29T00:00"))[0] == (utc("2026-03-29T00:30"), utc("2026-03-29T01:30"))
    assert is_open(spec, BERLIN, utc("2026-03-29T00:59")) and is_open(spec, BERLIN, utc("2026-03-29T01:00"))


def test_a_window_starting_in_the_skipped_hour_opens_when_the_clocks_jump():
    """The documented choice: 02:30 does not exist on 2026-03-29 in Berlin; the window opens at
    the jump (03:00 CEST = 01:00 UTC): shorter that day, never lost. The next Sunday it is 02:30 again."""
    spec = "Sun 02:30-04:00"
    assert not is_open(spec, BERLIN, utc("2026-03-29T00:59"))  # 01:59 CET
    assert next_open(spec, BERLIN, utc("2026-03-29T00:00")) == utc("2026-03-29T01:00")
    assert closes_at(spec, BERLIN, utc("2026-03-29T01:00")) == utc("2026-03-29T02:00")  # 04:00 CEST
    assert next_open(spec, BERLIN, utc("2026-03-29T02:00")) == utc("2026-04-05T00:30")  # 02:30 CEST


def test_a_window_wholly_inside_the_skipped_hour_does_not_happen_that_day():
    spec = "Sun 02:10-02:50"
    assert next_open(spec, BERLIN, utc("2026-03-28T12:00")) == utc("2026-04-05T00:10")
    assert not any(is_open(spec, BERLIN, utc("2026-03-29T00:50") + s) for s in range(0, 3600, 60))


def test_fall_back_the_window_follows_the_wall_clock():
    """Sat 22:00-05:00 over 2026-10-25: 22:00 CEST to 05:00 CET, eight real hours."""
    spec = "Sat 22:00-05:00"
    assert intervals(spec, BERLIN, utc("2026-10-24T21:00"))[0] == (utc("2026-10-24T20:00"), utc("2026-10-25T04:00"))
    # 01:30 CEST with a window to 03:30: two hours on the clock, three real hours (02:00-03:00 twice).
    late = "Sat 22:00-03:30"
    now = utc("2026-10-24T23:30")
    assert closes_at(late, BERLIN, now) == utc("2026-10-25T02:30")
    assert fits(late, BERLIN, now, 9000).ok and not fits(late, BERLIN, now, 10900).ok


def test_fall_back_a_window_including_the_repeated_hour_is_open_through_both():
    spec = "Sun 01:00-04:00"  # 01:00 CEST to 04:00 CET: four real hours
    assert intervals(spec, BERLIN, utc("2026-10-24T22:00"))[0] == (utc("2026-10-24T23:00"), utc("2026-10-25T03:00"))
    assert is_open(spec, BERLIN, utc("2026-10-25T00:15"))  # 02:15 CEST
    assert is_open(spec, BERLIN, utc("2026-10-25T01:15"))  # 02:15 CET


def test_a_boundary_in_the_repeated_hour_is_its_first_occurrence():
    closing = "Sun 01:00-02:30"
    assert closes_at(closing, BERLIN, utc("2026-10-25T00:00")) == utc("2026-10-25T00:30")  # 02:30 CEST
    assert not is_open(closing, BERLIN, utc("2026-10-25T01:15"))  # 02:15 CET: the window happened once
    opening = "Sun 02:30-04:00"
    assert next_open(opening, BERLIN, utc("2026-10-24T22:00")) == utc("2026-10-25T00:30")  # 02:30 CEST


def test_other_zones_half_hour_dst_and_no_dst():
    """Australia/Lord_Howe moves its clocks by 30 minutes; Asia/Kolkata never does."""
    # Lord Howe 2026-04-05: 02:00 LHDT (+11) -> 01:30 LHST (+10:30) at 15:00 UTC on the 4th.
    assert closes_at("Sat 22:00-03:00", "Australia/Lord_Howe", utc("2026-04-04T12:00")) == utc("2026-04-04T16:30")
    assert closes_at("Mon 10:00-11:00", "Asia/Kolkata", utc("2026-03-30T04:40")) == utc("2026-03-30T05:30")


def test_fits_says_when_outside_and_when_it_will_not_fit():
    spec = "Mon-Fri 22:00-05:00"
    outside = fits(spec, BERLIN, utc("2026-06-01T10:00"), 600)  # Mon 12:00
    assert not outside.ok and outside.reason == "outside window 'Mon-Fri 22:00-05:00' until 22:00 (Europe/Berlin)"
    late = utc("2026-06-02T02:50")  # Tue 04:50
    assert not fits(spec, BERLIN, late, 601).ok and fits(spec, BERLIN, late, 600).ok
    assert fits(spec, BERLIN, late, 600).reason == "inside window 'Mon-Fri 22:00-05:00' until 05:00 (Europe/Berlin)"
    assert "until Mon 22:00" in fits(spec, BERLIN, utc("2026-06-06T10:00"), 600).reason


@pytest.mark.parametrize("expected", [float("nan"), -1, float("inf")])
def test_an_expected_install_time_that_is_not_a_duration_is_refused(expected):
    """A NaN median (no installs yet, divided badly) would compare as fitting any window."""
    with pytest.raises(WindowError):
        fits("Mon-Sun 00:00-24:00", BERLIN, utc("2026-06-01T20:00"), expected)


def test_a_parsed_schedule_and_zone_can_be_passed_instead_of_text():
    schedule, zone = parse_windows("Mon-Fri 22:00-05:00"), parse_timezone(BERLIN)
    assert is_open(schedule, zone, utc("2026-06-01T20:00")) == is_open("Mon-Fri 22:00-05:00", BERLIN, utc("2026-06-01T20:00"))


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_window_corpus_is_refused_with_its_one_line_reason(case):
    """tests/corpus/window/: each spec or SITE_TIMEZONE is refused with a WindowError naming why."""
    text = (CORPUS / case["file"]).read_bytes().decode("utf-8")
    with pytest.raises(WindowError) as refused:
        parse_windows(text) if case["kind"] == "spec" else parse_timezone(text)
    message = str(refused.value)
    assert case["expect"] in message and "\n" not in message and len(message) < 300, message


def test_every_window_corpus_file_has_a_row_and_every_row_a_file():
    files = {f"window/{p.name}" for p in (CORPUS / "window").iterdir()}
    assert files == {c["file"] for c in CASES}
