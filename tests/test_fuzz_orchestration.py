"""Fuzzing the site-orchestration parsers (issue 16) with hypothesis, as test_fuzz_parsers.py does
for the other parsers (its run_fuzz: short and deterministic in `make check`, FUZZ_SECONDS of
fresh seeds in `make fuzz`).

No daemon reads these inputs yet (the gateway is wired in a later change), so the
properties are on the real modules:
- a window spec parses or raises WindowError, never anything else; for one that
  parses, in any of several zones (30-minute DST, no DST, southern hemisphere) and
  at any moment: is_open, closes_at, next_open and fits agree with each other;
- SITE_MAX_CONCURRENT and ROBOT_GROUPS parse or raise BudgetError;
- lease-table bytes parse or raise LeaseTableError; a table that parses renders
  back to bytes that parse to the same table, with one lease per robot and no
  robot both leased and queued;
- a POST /lease body (Wire 5, otad/gateway/leasewire.py, what the gateway's edge
  calls) parses or raises LeaseRequestError with one short line; a request that
  parses says the same when written back as JSON.
Findings go to tests/corpus/fuzz/ as `window-<what>` (spec, zone, epoch on three
lines), `leases-<what>` or `leasereq-<what>` (the bytes), replayed by
test_fuzz_parsers.py::test_fuzz_findings_stay_fixed with the checks below.
"""
from __future__ import annotations

import json

from hypothesis import strategies as st

from otad.gateway.leasewire import MAX_BODY_BYTES, OPS, LeaseRequestError, parse_lease_request

from otad.orchestration.budget import BudgetError, Budget, may_grant, parse_groups, parse_limit
from otad.orchestration.leases import LeaseTableError, parse_table
from otad.orchestration.windows import WindowError, closes_at, fits, is_open, next_open, parse_windows
from test_fuzz_parsers import documents, run_fuzz
from test_orchestration_leases import VALID_TABLE

ZONES = ("Europe/Berlin", "Australia/Lord_Howe", "Asia/Kolkata", "America/Santiago", "UTC", "Pacific/Chatham")
EPOCHS = st.integers(1_767_225_600, 1_798_761_600)  # 2026 and 2027
DST_DAYS = st.sampled_from([1_774_746_000, 1_792_890_000]).flatmap(lambda t: st.integers(t - 86_400, t + 86_400))

# Specs from the grammar's own pieces, often almost right.
_day = st.sampled_from(["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun", "mon", "Xyz", ""])
_days = st.lists(_day | st.builds(lambda a, b: f"{a}-{b}", _day, _day), min_size=1, max_size=3).map(",".join)
_time = st.builds(lambda h, m: f"{h:02d}:{m:02d}", st.integers(0, 25), st.sampled_from([0, 1, 29, 30, 59, 60]))
_window = st.builds(lambda d, a, b, sep: f"{d}{sep}{a}-{b}", _days, _time, _time, st.sampled_from([" ", "  ", "", "\t"]))
specs = st.lists(_window, min_size=1, max_size=4).map("; ".join) | st.text(max_size=80) | st.text(
    alphabet="MonTueWdhFriSatSu0123456789:-,; ", max_size=60)


def check_window(case: tuple[str, str, int]) -> None:
    spec, zone, now = case
    try:
        schedule = parse_windows(spec)
    except WindowError:
        return
    opened, closes, opens = is_open(schedule, zone, now), closes_at(schedule, zone, now), next_open(schedule, zone, now)
    assert opens is not None  # every valid spec opens within two weeks
    if opened:
        assert opens == now and (closes is None or closes > now)
        assert fits(schedule, zone, now, 0).ok == (closes is None or closes > now)
        if closes is not None:
            assert not is_open(schedule, zone, closes) and is_open(schedule, zone, closes - 1)
            assert not fits(schedule, zone, now, closes - now + 1).ok and fits(schedule, zone, now, closes - now).ok
    else:
        assert closes is None and opens > now and is_open(schedule, zone, opens) and not is_open(schedule, zone, opens - 1)
        assert not fits(schedule, zone, now, 0).ok and "outside window" in fits(schedule, zone, now, 0).reason


def test_fuzz_window_spec():
    run_fuzz(st.tuples(specs, st.sampled_from(ZONES), EPOCHS | DST_DAYS), check_window)


def check_budget(case: tuple[str, str, int]) -> None:
    limit_text, groups_text, robots = case
    try:
        budget = Budget(parse_limit(limit_text), parse_groups(groups_text))
    except BudgetError:
        return
    slots = budget.slots(robots)
    assert 0 <= slots and (slots >= 1 or budget.limit.count == 0 or not budget.limit.hundredths or robots == 0)
    for group in budget.groups.groups:
        assert group.min_available <= len(group.robots)
    verdict = may_grant("r1", {"r2"}, budget, robots)
    assert verdict.reason and "\n" not in verdict.reason


def test_fuzz_budget():
    limits = st.text(alphabet="0123456789.% -x", max_size=8) | st.text(max_size=8)
    group = st.builds(lambda n, ids, opt: f"{n}={','.join(ids)}{opt}", st.sampled_from(["a", "b", "", "z z"]),
                      st.lists(st.sampled_from(["r1", "r2", "r3", "", "../x"]), max_size=3),
                      st.sampled_from(["", " max=1", " max=50%", " min_available=2", " min_available=9", " max=x"]))
    groups = st.lists(group, max_size=3).map("; ".join) | st.text(max_size=40)
    run_fuzz(st.tuples(limits, groups, st.integers(0, 50)), check_budget)


def check_lease_table(data: bytes) -> None:
    try:
        table = parse_table(data)
    except LeaseTableError:
        return
    canonical = table.render()
    again = parse_table(canonical)
    assert again.render() == canonical and again.leases == table.leases and again.queue == table.queue
    assert not set(table.leases) & set(table.queue)
    assert all(l.lease_id < table.next_lease for l in table.leases.values())
    assert all(w.seq < table.next_seq for w in table.queue.values())
    assert [w.robot_id for w in table.order()] == [w.robot_id for w in again.order()]


def test_fuzz_lease_table():
    run_fuzz(documents(VALID_TABLE), check_lease_table)


def check_window_file(data: bytes) -> None:
    """A finding as a file: `spec\nzone\nepoch` in UTF-8 (tests/corpus/fuzz/window-<what>)."""
    spec, zone, now = data.decode("utf-8").split("\n")
    check_window((spec, zone, int(now)))


VALID_REQUESTS = ({"op": "request", "version": "2.0.0"}, {"op": "renew", "lease": 17},
                  {"op": "release", "lease": 17, "outcome": "withdrawn"},
                  {"op": "defer", "reason": "deferred by READY_CMD: retry-after=600", "too_long": False})


def check_lease_request(data: bytes) -> None:
    try:
        request = parse_lease_request(data)
    except LeaseRequestError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 300 and str(exc).startswith("lease request")
        return
    assert len(data) <= MAX_BODY_BYTES and request.op in OPS
    fields = {"request": {"version": request.version}, "renew": {"lease": request.lease},
              "release": {"lease": request.lease, "outcome": request.outcome},
              "defer": {"reason": request.reason, "too_long": request.too_long}}[request.op]
    assert parse_lease_request(json.dumps({"op": request.op, **fields}).encode()) == request


def test_fuzz_lease_request():
    strategy = documents(VALID_REQUESTS[0])
    for valid in VALID_REQUESTS[1:]:
        strategy = strategy | documents(valid)
    run_fuzz(strategy, check_lease_request)
