"""The concurrency budget: how many robots of a site, and of each robot group, may be out of
service (holding an install lease) at once, and how many of a group must stay working.

SITE_MAX_CONCURRENT is a count (`2`) or a share of the site's robots (`25%`); a
plan may set its own, which replaces the gateway's for that rollout (raising or
lowering it: the plan's author knows the release). A share rounds down, because
the budget is a ceiling on disruption, but to at least 1 robot when the share is
above 0 and the site has robots, so a small site still updates; `0` and `0%` hold
every install. ROBOT_GROUPS partitions robots (a zone, an aisle), each group with
its own `max` (count or share of the group, same rounding) and `min_available`:
never fewer than that many of the group working. A robot not working for another
reason (the gateway's `down` set: not heard from, failed) counts against
`min_available` too, since it is not working either. Syntax in docs/formats.md.
"""
from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from otad.orchestration import ID, OrchestrationError, Verdict

MAX_COUNT = 100_000
MAX_GROUPS = 256
MAX_GROUP_ROBOTS = 100_000  # all groups together
MAX_GROUPS_CHARS = 128 * 1024  # within the config reader's 256 KiB
_COUNT = re.compile(r"0|[1-9][0-9]{0,5}")
_PERCENT = re.compile(r"(0|[1-9][0-9]{0,2})(?:\.([0-9]{1,2}))?%")


class BudgetError(OrchestrationError):
    """SITE_MAX_CONCURRENT, a plan's override or ROBOT_GROUPS is malformed."""


@dataclass(frozen=True)
class Limit:
    """A count of robots, or a share in hundredths of a percent (exact: no float rounding)."""

    count: int | None = None
    hundredths: int | None = None  # 2550 means 25.5%

    def slots(self, robots: int) -> int:
        """How many of `robots` may hold a lease at once."""
        if self.count is not None:
            return self.count
        share = self.hundredths or 0
        if share == 0 or robots <= 0:
            return 0
        return max(1, share * robots // 10_000)

    def __str__(self) -> str:
        if self.count is not None:
            return str(self.count)
        whole, part = divmod(self.hundredths or 0, 100)
        return f"{whole}.{part:02d}".rstrip("0").rstrip(".") + "%"  # as written: 12.5%, 25%


def parse_limit(text: str, what: str = "SITE_MAX_CONCURRENT") -> Limit:
    """`N` (0..100000) or `P%` (0 to 100, at most two decimals)."""
    if not isinstance(text, str):
        raise BudgetError(f"{what} is not text")
    value = text.strip()
    if _COUNT.fullmatch(value):
        count = int(value)
        if count > MAX_COUNT:
            raise BudgetError(f"{what} {value} is more than {MAX_COUNT}")
        return Limit(count=count)
    match = _PERCENT.fullmatch(value)
    if match is None:
        raise BudgetError(f"{what} {value[:40]!r} is not a count (2) or a percentage (25%)")
    hundredths = int(match[1]) * 100 + int((match[2] or "0").ljust(2, "0"))
    if hundredths > 10_000:
        raise BudgetError(f"{what} {value} is more than 100%")
    return Limit(hundredths=hundredths)


@dataclass(frozen=True)
class Group:
    name: str
    robots: frozenset[str]
    max: Limit | None = None  # None: only the site's budget applies
    min_available: int = 0


@dataclass(frozen=True)
class Groups:
    groups: tuple[Group, ...] = ()
    member: Mapping[str, str] = field(default_factory=dict)  # robot -> group name

    def of(self, robot_id: str) -> Group | None:
        name = self.member.get(robot_id)
        return next((g for g in self.groups if g.name == name), None) if name is not None else None


def parse_groups(text: str) -> Groups:
    """ROBOT_GROUPS: `NAME=ID,ID,... [max=LIMIT] [min_available=N]`, groups separated by `;`.
    Empty text: no groups."""
    if not isinstance(text, str):
        raise BudgetError("ROBOT_GROUPS is not text")
    if len(text) > MAX_GROUPS_CHARS:
        raise BudgetError(f"ROBOT_GROUPS is longer than {MAX_GROUPS_CHARS} characters")
    if not text.strip():
        return Groups()
    if not re.fullmatch(r"[\x20-\x7e]*", text):
        raise BudgetError("ROBOT_GROUPS holds a character that is not printable ASCII")
    parts = [part.strip() for part in text.split(";")]
    if len(parts) > MAX_GROUPS:
        raise BudgetError(f"ROBOT_GROUPS has more than {MAX_GROUPS} groups")
    groups: list[Group] = []
    member: dict[str, str] = {}
    for part in parts:
        if not part:
            raise BudgetError("ROBOT_GROUPS has an empty group (a ';' with nothing beside it)")
        group = _group(part)
        if any(g.name == group.name for g in groups):
            raise BudgetError(f"ROBOT_GROUPS names group {group.name!r} twice")
        for robot in group.robots:
            if robot in member:
                raise BudgetError(f"ROBOT_GROUPS puts robot {robot!r} in two groups ({member[robot]}, {group.name})")
            member[robot] = group.name
        if len(member) > MAX_GROUP_ROBOTS:
            raise BudgetError(f"ROBOT_GROUPS names more than {MAX_GROUP_ROBOTS} robots")
        groups.append(group)
    return Groups(tuple(groups), member)


def _group(text: str) -> Group:
    head, *options = text.split()
    name, sep, ids = head.partition("=")
    if not sep or not ID.fullmatch(name):
        raise BudgetError(f"ROBOT_GROUPS group {head[:40]!r} is not NAME=ROBOT,ROBOT,...")
    robots = ids.split(",")
    if not all(ID.fullmatch(r) for r in robots):
        raise BudgetError(f"ROBOT_GROUPS group {name!r} has a robot id that is not an id: {ids[:40]!r}")
    if len(set(robots)) != len(robots):
        raise BudgetError(f"ROBOT_GROUPS group {name!r} names a robot twice")
    values: dict[str, str] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if key not in ("max", "min_available") or not sep:
            raise BudgetError(f"ROBOT_GROUPS group {name!r} has an unknown option {option[:30]!r} (max=, min_available=)")
        if key in values:
            raise BudgetError(f"ROBOT_GROUPS group {name!r} sets {key} twice")
        values[key] = value
    limit = parse_limit(values["max"], f"ROBOT_GROUPS group {name!r} max") if "max" in values else None
    minimum = values.get("min_available", "0")
    if not _COUNT.fullmatch(minimum):
        raise BudgetError(f"ROBOT_GROUPS group {name!r} min_available {minimum[:20]!r} is not a whole number")
    if int(minimum) > len(robots):
        raise BudgetError(f"ROBOT_GROUPS group {name!r} min_available {minimum} is more than its {len(robots)} robots")
    return Group(name, frozenset(robots), limit, int(minimum))


@dataclass(frozen=True)
class Budget:
    site: Limit  # the gateway's SITE_MAX_CONCURRENT
    groups: Groups = field(default_factory=Groups)
    plan: Limit | None = None  # the plan's override, when it sets one

    @property
    def limit(self) -> Limit:
        return self.plan if self.plan is not None else self.site

    def slots(self, site_robots: int) -> int:
        return self.limit.slots(site_robots)


def may_grant(robot_id: str, leased: Collection[str], budget: Budget, site_robots: int,
              down: Collection[str] = ()) -> Verdict:
    """May `robot_id` take a lease now, given the robots holding one (`leased`)?

    `site_robots`: how many robots the site has (what a percentage is of).
    `down`: robots out of service for other reasons (they count against
    `min_available`, not against the budget). A robot already holding a lease
    may keep it: asking again is never a second grant.
    """
    held = set(leased)
    if robot_id in held:
        return Verdict(True, f"{robot_id} already holds a lease")
    slots = budget.slots(site_robots)
    source = "the plan's" if budget.plan is not None else "SITE_MAX_CONCURRENT"
    if len(held) >= slots:
        return Verdict(False, f"site budget full: {len(held)} of {slots} leases in use ({source} {budget.limit})")
    group = budget.groups.of(robot_id)
    if group is None:
        return Verdict(True, f"{len(held) + 1} of {slots} leases with {robot_id} ({source} {budget.limit})")
    in_group = held & group.robots
    if group.max is not None:
        group_slots = group.max.slots(len(group.robots))
        if len(in_group) >= group_slots:
            return Verdict(False, f"group {group.name} budget full: {len(in_group)} of {group_slots} leases in use (max {group.max})")
    working_after = len(group.robots - held - set(down) - {robot_id})
    if working_after < group.min_available:
        return Verdict(False, f"group {group.name} would have {working_after} robots working, "
                              f"fewer than min_available {group.min_available}")
    return Verdict(True, f"{len(held) + 1} of {slots} leases with {robot_id}; group {group.name} keeps "
                         f"{working_after} working (min_available {group.min_available})")
