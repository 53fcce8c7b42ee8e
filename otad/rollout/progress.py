"""Phase decisions: which phases are open, whether the next may start, whether to halt.

The same pure function serves the dashboard (scope: the fleet) and each
gateway (scope: its site), online or with its WAN down. Inputs are facts that
only grow (phase start times, robots' outcomes), so a daemon killed at any
moment recomputes the same decisions from what it had persisted: a halt lasts
as long as its evidence, which never shrinks. A resume is a revision with
`halt_since`: the criteria then judge only outcomes from that instant on
(`tally(..., since=)`), which is also a fact that only grows.

Rules, in order:
- the plan's state wins: a `paused` or `aborted` plan opens nothing, whatever
  local evidence says (a fleet-wide abort wins over a local advance);
- halt criteria are checked for every open phase: at the dashboard the fleet
  criteria on fleet counts; at a site its own criteria on its counts, and the
  fleet `max_failures` on its counts too (the fleet has failed at least as
  often as one site, so this is sound while the site is dark);
- the next phase starts once the last one has soaked `min_soak_s`, an
  `approve` gate has the operator's signed approval (`approved_phase`), and,
  when the dashboard is unreachable, `offline_policy` allows it: `hold` starts
  nothing new, `continue` goes no further than `offline_max_phase`.

A failure is a rollback, a blacklist, or an install that did not finish
(commit or fail) within `install_timeout_s` of its start (`tally`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from otad.rollout.plan import Criteria, Plan

EVENT_KINDS = ("offered", "installed", "committed", "rolled_back", "blacklisted")
FAILURES = ("rolled_back", "blacklisted")


@dataclass(frozen=True)
class Counts:
    """Robots of one phase in one scope, each counted once by its outcome."""

    installing: int = 0  # started, not finished, not yet timed out
    committed: int = 0
    failed: int = 0  # rolled back, blacklisted or timed out

    @property
    def attempts(self) -> int:
        """Finished attempts: what `min_attempts` and the failure rate count."""
        return self.committed + self.failed


@dataclass(frozen=True)
class Evidence:
    fleet: Mapping[int, Counts] = field(default_factory=dict)  # phase -> counts over every site
    sites: Mapping[str, Mapping[int, Counts]] = field(default_factory=dict)  # site -> phase -> counts


@dataclass(frozen=True)
class Event:
    robot_id: str
    site: str
    phase: int
    kind: str  # one of EVENT_KINDS
    at: float  # epoch seconds


@dataclass(frozen=True)
class Halt:
    state: str  # the plan state it calls for: "paused" (on_halt=pause) or "aborted" (on_halt=rollback)
    reason: str
    scope: str  # "fleet" or "site"
    phase: int


@dataclass(frozen=True)
class Progress:
    opened: int  # phases 0 .. opened-1 have started in this scope
    advance: bool  # start phase `opened` now
    halt: Halt | None  # stop now (None also when the plan is already stopped)
    waiting: str  # why nothing more happens, or what just happened
    next_at: float | None = None  # when the soak ends, if that is what holds the next phase


@dataclass(frozen=True)
class Attempt:
    """One robot's install in one phase at one site: the kinds of its events and when the first came."""

    robot_id: str
    site: str
    phase: int
    kinds: frozenset[str]  # of EVENT_KINDS
    started: float  # epoch seconds of its first event


def tally(plan: Plan, events: Iterable[Event], now: float, since: float = 0.0) -> Evidence:
    """Counts per phase, fleet-wide and per site, from robots' events for this plan.

    `since`: only events from then on (a plan's `halt_since`: what the halt criteria judge
    after an operator resumed; the counts shown keep every event)."""
    return count(plan, attempts(e for e in events if e.at >= since), now)


def attempts(events: Iterable[Event]) -> list[Attempt]:
    """Events grouped per (site, robot, phase), other kinds left out: what `count` judges.
    A store may group its events into attempts itself (the dashboard's does, in SQL)."""
    grouped: dict[tuple[str, str, int], tuple[set[str], float]] = {}
    for event in events:
        if event.kind in EVENT_KINDS:
            kinds, first = grouped.setdefault((event.site, event.robot_id, event.phase), (set(), event.at))
            kinds.add(event.kind)
            if event.at < first:
                grouped[event.site, event.robot_id, event.phase] = (kinds, event.at)
    return [Attempt(robot, site, phase, frozenset(kinds), first)
            for (site, robot, phase), (kinds, first) in grouped.items()]


def count(plan: Plan, seen: Iterable[Attempt], now: float) -> Evidence:
    """Each attempt once, by its outcome, per phase fleet-wide and per site (phases the plan lacks: none)."""
    fleet: dict[int, list[int]] = {}
    sites: dict[str, dict[int, list[int]]] = {}
    for attempt in seen:
        if not 0 <= attempt.phase < len(plan.phases):
            continue
        slot = _outcome(attempt.kinds, attempt.started, plan.install_timeout_s, now)
        for table in (fleet, sites.setdefault(attempt.site, {})):
            table.setdefault(attempt.phase, [0, 0, 0])[slot] += 1
    return Evidence(fleet={p: Counts(*c) for p, c in fleet.items()},
                    sites={s: {p: Counts(*c) for p, c in t.items()} for s, t in sites.items()})


def _outcome(kinds: frozenset[str], started: float, timeout: int, now: float) -> int:
    """0 installing, 1 committed, 2 failed: a failure outweighs an earlier commit."""
    if not kinds.isdisjoint(FAILURES):
        return 2
    if "committed" in kinds:
        return 1
    return 2 if now - started > timeout else 0


def opened_phases(started: Mapping[int, float]) -> int:
    """Phases open in order: the count of consecutive start times from phase 0."""
    n = 0
    while n in started:
        n += 1
    return n


def breach(criteria: Criteria | None, counts: Counts | None, counts_only: bool = False) -> str | None:
    """Why these counts breach the criteria, or None. `counts_only`: judge max_failures alone."""
    if criteria is None or counts is None:
        return None
    if criteria.max_failures is not None and counts.failed > criteria.max_failures:
        return f"{counts.failed} failed, more than max_failures {criteria.max_failures}"
    if counts_only or criteria.max_failure_rate is None or counts.attempts < max(criteria.min_attempts, 1):
        return None
    rate = counts.failed / counts.attempts
    if rate > criteria.max_failure_rate:
        return (f"{counts.failed} of {counts.attempts} failed ({rate:.0%}), above max_failure_rate "
                f"{criteria.max_failure_rate:g} after {counts.attempts} attempts (min_attempts {criteria.min_attempts})")
    return None


def find_halt(plan: Plan, opened: int, evidence: Evidence, site: str | None) -> Halt | None:
    """The first open phase whose criteria the evidence breaches, in this scope."""
    state = "aborted" if plan.on_halt == "rollback" else "paused"
    local = evidence.sites.get(site, {}) if site is not None else {}
    for n in range(min(opened, len(plan.phases))):
        phase = plan.phases[n]
        if site is None:
            why = breach(phase.fleet, evidence.fleet.get(n))
            if why:
                return Halt(state, f"phase {n} fleet-wide: {why}", "fleet", n)
            continue
        why = breach(phase.fleet, local.get(n), counts_only=True)
        if why:
            return Halt(state, f"phase {n} fleet-wide criterion at site {site} alone: {why}", "site", n)
        why = breach(phase.site, local.get(n))
        if why:
            return Halt(state, f"phase {n} at site {site}: {why}", "site", n)
    return None


def evaluate(plan: Plan, started: Mapping[int, float], evidence: Evidence, now: float, *,
             site: str | None = None, online: bool = True) -> Progress:
    """The decision for one scope: the fleet (`site=None`, the dashboard) or one site.

    `started`: phase index -> when it started in this scope. `online`: the
    dashboard is reachable (always True at the dashboard itself).
    """
    opened = opened_phases(started)
    if plan.state != "active":
        why = f": {plan.reason}" if plan.reason else ""
        return Progress(opened, False, None, f"rollout {plan.rollout_id} is {plan.state}{why}")
    halt = find_halt(plan, opened, evidence, site)
    if halt is not None:
        return Progress(opened, False, halt, f"halt: {halt.reason}")
    if opened >= len(plan.phases):
        return Progress(opened, False, None, f"all {len(plan.phases)} phases have started")
    if not online and plan.offline_policy == "hold":
        return Progress(opened, False, None, "the dashboard is unreachable and offline_policy=hold: no new phase")
    if not online and opened > plan.offline_max_phase:
        return Progress(opened, False, None, f"the dashboard is unreachable: phase {opened} is beyond offline_max_phase {plan.offline_max_phase}")
    if opened == 0:
        return Progress(0, True, None, "phase 0 starts")
    last = plan.phases[opened - 1]
    soaked_at = started[opened - 1] + last.min_soak_s
    if now < soaked_at:
        return Progress(opened, False, None, f"phase {opened - 1} soaks for {soaked_at - now:.0f}s more", next_at=soaked_at)
    if last.advance == "approve" and plan.approved_phase < opened:
        return Progress(opened, False, None, f"phase {opened} waits for an operator's approval")
    return Progress(opened, True, None, f"phase {opened} starts")


def advance(plan: Plan, started: Mapping[int, float], evidence: Evidence, now: float, *,
            site: str | None = None, online: bool = True) -> tuple[Progress, dict[int, float]]:
    """evaluate, then the start times to persist: `now` added for the phase it starts."""
    progress = evaluate(plan, started, evidence, now, site=site, online=online)
    new = dict(started)
    if progress.advance:
        new[progress.opened] = now
    return progress, new
