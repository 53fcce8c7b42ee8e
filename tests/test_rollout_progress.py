"""Phase decisions (otad/rollout/progress.py): the issue's "Must hold" scenarios at the logic level.

No daemon carries plans out yet (issue 15's foundation; the end-to-end tests on
the netns topology come with the wiring), so these tests drive the real
module: the dashboard's evaluation (scope: the fleet) and each gateway's (scope:
its site, online or dark) on tallies of robots' events, with a given clock.
"""
from __future__ import annotations

from otad.rollout.cohort import assignment, phase_of
from otad.rollout.progress import Attempt, Counts, Event, Evidence, advance, attempts, breach, count, evaluate, tally
from otad.rollout.plan import Criteria, revise
from rollouts import make_plan

T0 = 1_790_000_000.0
AUTO = [{"robots": ["a1", "b1"], "min_soak_s": 600, "halt": {"fleet": {"max_failures": 0}, "site": {"max_failures": 0}}},
        {"percent": 50, "min_soak_s": 600, "halt": {"site": {"max_failures": 0}}},
        {"percent": 100}]
SITES = {"A": [f"a{n}" for n in range(1, 6)], "B": [f"b{n}" for n in range(1, 6)]}


def ev(robot: str, kind: str, at: float, phase: int = 0) -> Event:
    return Event(robot, robot[0].upper(), phase, kind, at)


def test_canary_then_phases_and_no_robot_outside_the_open_phases_ever_installs():
    """Two sites of five robots step through time; at every step each robot asks for its assignment,
    installs what it gets and commits one step later. Checked at every step, not at the end."""
    plan = make_plan(phases=AUTO, **{"from": ["1.0.0"]})
    started = {site: {} for site in SITES}
    version = {r: "1.0.0" for robots in SITES.values() for r in robots}
    events: list[Event] = []
    history = []
    for step in range(40):
        now = T0 + step * 60
        evidence = tally(plan, events, now)
        for site, robots in SITES.items():
            progress, started[site] = advance(plan, started[site], evidence, now, site=site)
            assert progress.halt is None, progress
            opened = len(started[site])
            for robot in robots:
                got = assignment(plan, robot, version[robot], opened)
                if got.version is not None:
                    assert got.phase < opened and phase_of(plan, robot) < opened
                    version[robot] = got.version
                    events += [ev(robot, "installed", now, got.phase), ev(robot, "committed", now + 30, got.phase)]
            history.append((step, site, opened))
    assert all(v == "2.0.0" for v in version.values())
    for site in SITES:  # phase 1 starts after phase 0's 600 s soak, phase 2 after phase 1's
        assert started[site] == {0: T0, 1: T0 + 600, 2: T0 + 1200}
    assert [o for s, site, o in history if site == "A"][:12] == [1] * 10 + [2, 2]


def test_a_failing_canary_with_site_a_dark():
    """Site A halts on its own canary's rollback; the dashboard halts the fleet on B's; with
    on_halt=rollback the robots that had the release go back; B starts no next phase."""
    plan = make_plan(phases=AUTO, on_halt="rollback", offline_policy="continue", offline_max_phase=2)
    started = {0: T0}
    events = [ev("a1", "installed", T0 + 60), ev("a1", "rolled_back", T0 + 90), ev("a1", "blacklisted", T0 + 90),
              ev("b1", "installed", T0 + 60), ev("b1", "rolled_back", T0 + 120)]
    now = T0 + 700  # past the canary's soak: without the halt, phase 1 would start
    site_a = evaluate(plan, started, tally(plan, events[:3], now), now, site="A", online=False)
    assert not site_a.advance and site_a.halt.scope == "site" and site_a.halt.state == "aborted"
    assert "at site A alone: 1 failed, more than max_failures 0" in site_a.halt.reason  # counted once, not twice
    assert assignment(plan, "a1", "2.0.0", site_a.opened, halted=True, came_from="1.0.0").version == "1.0.0"
    fleet = evaluate(plan, started, tally(plan, events[3:], now), now)  # the dashboard sees only B: A is dark
    assert fleet.halt.scope == "fleet" and fleet.halt.state == "aborted" and "phase 0 fleet-wide: 1 failed" in fleet.halt.reason
    aborted = revise(plan, state=fleet.halt.state, reason=fleet.halt.reason)  # the dashboard's signed revision
    site_b = evaluate(aborted, started, Evidence(), now + 3600, site="B")
    assert not site_b.advance and site_b.opened == 1 and "aborted: phase 0 fleet-wide" in site_b.waiting
    back = assignment(aborted, "b1", "2.0.0", site_b.opened, came_from="1.0.0")
    assert back.version == "1.0.0" and back.rollback
    assert assignment(aborted, "b2", "1.0.0", 3).version is None  # never had it: stays


def test_offline_policy_hold_starts_no_new_phase():
    plan = make_plan(phases=AUTO, offline_policy="hold")
    progress = evaluate(plan, {0: T0}, Evidence(), T0 + 10_000, site="A", online=False)
    assert not progress.advance and "offline_policy=hold" in progress.waiting
    assert assignment(plan, "a1", "1.0.0", progress.opened).version == "2.0.0"  # the phase it is in goes on
    assert evaluate(plan, {0: T0}, Evidence(), T0 + 10_000, site="A", online=True).advance


def test_offline_policy_continue_advances_on_local_evidence_up_to_its_cap():
    plan = make_plan(phases=AUTO, offline_policy="continue", offline_max_phase=1)
    progress, started = advance(plan, {0: T0}, Evidence(), T0 + 600, site="A", online=False)
    assert progress.advance and started == {0: T0, 1: T0 + 600}
    capped = evaluate(plan, started, Evidence(), T0 + 100_000, site="A", online=False)
    assert not capped.advance and "phase 2 is beyond offline_max_phase 1" in capped.waiting
    local = tally(plan, [ev("a3", "installed", T0 + 700, 1), ev("a3", "rolled_back", T0 + 800, 1)], T0 + 900)
    halted = evaluate(plan, started, local, T0 + 900, site="A", online=False)
    assert halted.halt and "phase 1 at site A" in halted.halt.reason  # local evidence halts it, dark or not


def test_an_approve_phase_waits_for_the_operators_signed_approval():
    plan = make_plan()  # phase 1's advance is "approve": phase 2 needs approved_phase >= 2
    started = {0: T0, 1: T0 + 600}
    waiting = evaluate(plan, started, Evidence(), T0 + 100_000, site="B")
    assert not waiting.advance and "phase 2 waits for an operator's approval" in waiting.waiting
    approved = make_plan(revision=2, approved_phase=2)
    for site in SITES:  # every site proceeds on the same revision
        assert evaluate(approved, started, Evidence(), T0 + 100_000, site=site).advance
    assert not evaluate(approved, started, Evidence(), T0 + 2399, site="A").advance  # the soak still holds


def test_a_fleet_wide_abort_wins_over_a_local_advance():
    """A dark site that advanced to phase 1 on local evidence takes the fleet's aborted revision when
    its WAN returns: no further phase, and robots of its open phases get no new install."""
    plan = make_plan(phases=AUTO, offline_policy="continue", offline_max_phase=2, on_halt="pause")
    _, started = advance(plan, {0: T0}, Evidence(), T0 + 600, site="A", online=False)
    assert len(started) == 2
    aborted = make_plan(phases=AUTO, revision=3, state="aborted", on_halt="pause", reason="fleet: 3 failed")
    after = evaluate(aborted, started, Evidence(), T0 + 5000, site="A", online=True)
    assert not after.advance and after.opened == 2 and "aborted: fleet: 3 failed" in after.waiting
    robot = next(r for r in (f"a{n}" for n in range(100)) if phase_of(plan, r) == 1)
    assert assignment(aborted, robot, "1.0.0", after.opened).version is None


def test_an_install_that_does_not_finish_in_time_is_a_failure():
    plan = make_plan(phases=AUTO)  # install_timeout_s 900
    events = [ev("a1", "offered", T0)]
    assert tally(plan, events, T0 + 900).sites["A"][0] == Counts(installing=1)
    assert tally(plan, events, T0 + 901).sites["A"][0] == Counts(failed=1)
    assert evaluate(plan, {0: T0}, tally(plan, events, T0 + 901), T0 + 901, site="A").halt is not None
    done = events + [ev("a1", "installed", T0 + 300), ev("a1", "committed", T0 + 600)]
    assert tally(plan, done, T0 + 5000).fleet[0] == Counts(committed=1)


def test_an_install_times_out_from_its_first_event_whatever_order_events_come_in():
    """The dashboard's store hands `count` attempts it grouped itself; the gateway's events go
    through `attempts`: either way, the earliest event starts the clock and a failure outweighs a commit."""
    plan = make_plan(phases=AUTO)  # install_timeout_s 900
    late_first = [ev("a1", "installed", T0 + 800), ev("a1", "offered", T0)]
    assert tally(plan, late_first, T0 + 901).sites["A"][0] == Counts(failed=1)
    assert tally(plan, [ev("a2", "committed", T0), ev("a2", "rolled_back", T0 + 5)], T0 + 10).fleet[0] == Counts(failed=1)
    assert attempts([ev("a1", "installed", T0 + 800), ev("a1", "offered", T0)]) == [
        Attempt("a1", "A", 0, frozenset({"installed", "offered"}), T0)]
    assert count(plan, [Attempt("a1", "A", 7, frozenset({"committed"}), T0)], T0) == Evidence()  # no phase 7


def test_the_failure_rate_counts_only_after_min_attempts():
    rate = Criteria(max_failure_rate=0.1, min_attempts=4)
    assert breach(rate, Counts(committed=2, failed=1)) is None  # 3 attempts: too early to judge a rate
    assert "1 of 4 failed (25%)" in breach(rate, Counts(committed=3, failed=1))
    assert breach(rate, Counts(committed=9, failed=1)) is None  # 10 % is not above 10 %
    assert breach(Criteria(max_failures=2), Counts(failed=2)) is None and breach(Criteria(max_failures=2), Counts(failed=3))


def test_a_paused_plan_opens_nothing_and_a_resume_opens_again():
    plan = make_plan(phases=AUTO, state="paused", reason="operator")
    assert not evaluate(plan, {0: T0}, Evidence(), T0 + 5000, site="A").advance
    assert evaluate(make_plan(phases=AUTO, revision=2), {0: T0}, Evidence(), T0 + 5000, site="A").advance


def test_decisions_are_recomputed_identically_after_a_restart():
    """What a gateway killed at any moment would do: from the persisted start times and events,
    a second evaluation reaches the same decision (no state outside its inputs)."""
    plan = make_plan(phases=AUTO)
    events = [ev("a1", "installed", T0 + 10), ev("a1", "committed", T0 + 20)]
    first, started = advance(plan, {0: T0}, tally(plan, events, T0 + 650), T0 + 650, site="A")
    again, started_again = advance(plan, {0: T0}, tally(plan, list(reversed(events)), T0 + 650), T0 + 650, site="A")
    assert first == again and started == started_again
    assert not advance(plan, started, tally(plan, events, T0 + 651), T0 + 651, site="A")[0].advance  # no double start


def test_after_a_resume_the_halt_criteria_judge_only_what_happened_since():
    """A fleet halt paused the plan on a1's rollback; the operator resumed it (a revision with
    halt_since = the resume). The old failure must not halt it again at once, but a new one does,
    and the counts still hold both."""
    plan = make_plan(phases=AUTO, on_halt="pause")
    started = {0: T0}
    failed = [ev("a1", "installed", T0 + 60), ev("a1", "rolled_back", T0 + 90)]
    now = T0 + 300
    assert evaluate(plan, started, tally(plan, failed, now), now).halt is not None
    resumed = revise(plan, state="active", halt_since="2026-09-21T14:20:00Z")
    since = resumed.halt_since_epoch
    assert T0 + 90 < since < T0 + 900
    later = since + 10
    assert evaluate(resumed, started, tally(resumed, failed, later, since=since), later).halt is None
    again = failed + [ev("b1", "installed", since + 5), ev("b1", "rolled_back", since + 8)]
    halt = evaluate(resumed, started, tally(resumed, again, later, since=since), later).halt
    assert halt is not None and "1 failed" in halt.reason
    assert tally(resumed, again, later).fleet[0].failed == 2  # what the console shows: everything
