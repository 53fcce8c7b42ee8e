"""The concurrency budget (otad/orchestration/budget.py): SITE_MAX_CONCURRENT, a plan's override,
ROBOT_GROUPS with per-group max and min_available, and may_grant, on the real module.

No daemon reads these yet (issue 16's foundation; the gateway wires them in a
later change), so the tests call the parsers and may_grant directly.
"""
from __future__ import annotations

import pytest

from otad.errors import ConfigError
from otad.orchestration.budget import Budget, BudgetError, Limit, may_grant, parse_groups, parse_limit


@pytest.mark.parametrize("text, limit", [
    ("2", Limit(count=2)), ("0", Limit(count=0)), (" 3 ", Limit(count=3)), ("25%", Limit(hundredths=2500)),
    ("12.5%", Limit(hundredths=1250)), ("33.33%", Limit(hundredths=3333)), ("100%", Limit(hundredths=10000)),
    ("0%", Limit(hundredths=0)), ("0.01%", Limit(hundredths=1)),
])
def test_limits_parse(text, limit):
    assert parse_limit(text) == limit


@pytest.mark.parametrize("text, why", [
    ("", "is not a count"), ("-1", "is not a count"), ("2.5", "is not a count"), ("101%", "more than 100%"),
    ("100.01%", "more than 100%"), ("1e3", "is not a count"), ("25 %", "is not a count"), ("%", "is not a count"),
    ("0x10", "is not a count"), ("007", "is not a count"), ("\uff12", "is not a count"), ("100001", "more than 100000"),
    ("9999999", "is not a count"), ("12.345%", "is not a count"), ("NaN", "is not a count"), ("2\n3", "is not a count"),
])
def test_bad_limits_are_refused_with_one_line(text, why):
    with pytest.raises(BudgetError) as refused:
        parse_limit(text)
    assert why in str(refused.value) and "\n" not in str(refused.value)


def test_budget_error_is_a_config_error_and_a_value_error():
    with pytest.raises(ConfigError):
        parse_limit("x")
    with pytest.raises(ValueError):
        parse_groups("a")


@pytest.mark.parametrize("text, robots, slots", [
    ("25%", 6, 1),  # 1.5 rounds down
    ("50%", 6, 3), ("100%", 6, 6), ("34%", 3, 1),  # 1.02 -> 1
    ("10%", 3, 1),  # 0.3: at least one robot when the share is above 0
    ("0.01%", 1, 1), ("0%", 6, 0), ("100%", 0, 0), ("66.67%", 3, 2), ("2", 1, 2), ("0", 6, 0),
])
def test_a_share_rounds_down_but_to_at_least_one(text, robots, slots):
    assert parse_limit(text).slots(robots) == slots


@pytest.mark.parametrize("text", ["12.5%", "25%", "0%", "0.01%", "100%", "33.33%", "7"])
def test_a_limit_is_shown_as_written(text):
    assert str(parse_limit(text)) == text


def test_the_plan_overrides_the_gateway_both_ways():
    site = parse_limit("3")
    assert Budget(site, plan=parse_limit("1")).slots(6) == 1
    assert Budget(site, plan=parse_limit("100%")).slots(6) == 6
    assert Budget(site).slots(6) == 3
    refused = may_grant("r2", {"r1"}, Budget(site, plan=parse_limit("1")), 6)
    assert not refused.ok and refused.reason == "site budget full: 1 of 1 leases in use (the plan's 1)"


def test_groups_parse():
    groups = parse_groups("zone-a=r1,r2,r3 max=1 min_available=2; zone-b=r4,r5 max=50%;dock=r6")
    assert [g.name for g in groups.groups] == ["zone-a", "zone-b", "dock"]
    assert groups.of("r2").robots == frozenset({"r1", "r2", "r3"}) and groups.of("r2").max == Limit(count=1)
    assert groups.of("r5").max == Limit(hundredths=5000) and groups.of("r6").min_available == 0
    assert groups.of("r9") is None and parse_groups("").groups == () and parse_groups("  ").groups == ()


@pytest.mark.parametrize("text, why", [
    ("zone-a", "is not NAME=ROBOT,ROBOT"), ("=r1", "is not NAME=ROBOT,ROBOT"), ("a=r1;a=r2", "names group 'a' twice"),
    ("a=r1;b=r1", "puts robot 'r1' in two groups (a, b)"), ("a=r1,r1", "names a robot twice"),
    ("a=r1,,r2", "not an id"), ("a=../x", "not an id"), ("a=r1 min_available=2", "more than its 1 robots"),
    ("a=r1 min_available=-1", "is not a whole number"), ("a=r1 max=2 max=3", "sets max twice"),
    ("a=r1 zone=3", "unknown option"), ("a=r1 max", "unknown option"), ("a=r1 max=150%", "more than 100%"),
    ("a=r1;", "empty group"), ("a=r1\tmax=1", "not printable ASCII"), ("a=r\u00e91", "not printable ASCII"),
    (";".join(f"g{n}=r{n}" for n in range(257)), "more than 256 groups"), ("a=" + "r," * 70000 + "r", "longer than"),
])
def test_bad_groups_are_refused_with_one_line(text, why):
    with pytest.raises(BudgetError) as refused:
        parse_groups(text)
    assert why in str(refused.value) and "\n" not in str(refused.value) and len(str(refused.value)) < 300


def test_may_grant_respects_the_site_budget():
    budget = Budget(parse_limit("2"))
    assert may_grant("r3", {"r1"}, budget, 6).ok
    full = may_grant("r3", {"r1", "r2"}, budget, 6)
    assert not full.ok and full.reason == "site budget full: 2 of 2 leases in use (SITE_MAX_CONCURRENT 2)"
    assert may_grant("r1", {"r1", "r2"}, budget, 6).reason == "r1 already holds a lease"  # asking again: the same lease
    assert not may_grant("r1", set(), Budget(parse_limit("0")), 6).ok  # 0 holds every install


def test_may_grant_respects_a_groups_max():
    budget = Budget(parse_limit("100%"), parse_groups("a=r1,r2,r3 max=1; b=r4,r5"))
    refused = may_grant("r2", {"r1"}, budget, 6)
    assert not refused.ok and refused.reason == "group a budget full: 1 of 1 leases in use (max 1)"
    assert may_grant("r4", {"r1"}, budget, 6).ok and may_grant("r6", {"r1", "r4", "r5"}, budget, 6).ok


def test_may_grant_never_leaves_a_group_below_min_available():
    budget = Budget(parse_limit("100%"), parse_groups("a=r1,r2,r3,r4 min_available=2"))
    assert may_grant("r2", {"r1"}, budget, 6).ok  # 2 left working
    refused = may_grant("r3", {"r1", "r2"}, budget, 6)
    assert not refused.ok and refused.reason == "group a would have 1 robots working, fewer than min_available 2"
    # A robot down for another reason is not working either.
    down = may_grant("r2", {"r1"}, budget, 6, down={"r4"})
    assert not down.ok and "would have 1 robots working" in down.reason
    assert may_grant("r2", set(), budget, 6, down={"r2"}).ok  # the asking robot is up, whatever `down` said
