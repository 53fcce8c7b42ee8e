"""Cohorts and assignments (otad/rollout/cohort.py), on the real module.

No daemon computes cohorts yet (issue 15's foundation): these tests check
that the hash is deterministic and uniform enough over 10,000 robot ids, that
phases are cumulative, and what `assignment` gives a robot in each situation
of the issue (outside the open phases, away while a rollout ran, halted, aborted).
"""
from __future__ import annotations

from otad.rollout.cohort import assignment, cohort_point, may_install, phase_of
from rollouts import make_plan

IDS = [f"robot-{n:05d}" for n in range(10_000)]


def test_the_cohort_point_is_deterministic_and_depends_on_the_rollout():
    assert cohort_point("app-2.0.0", "robot-00001") == cohort_point("app-2.0.0", "robot-00001")
    assert cohort_point("app-2.0.0", "robot-00001") != cohort_point("app-2.1.0", "robot-00001")
    assert cohort_point("ab", "c") != cohort_point("a", "bc")  # fields are separated
    assert all(0 <= cohort_point("app-2.0.0", r) < 1 for r in IDS)


def test_percentages_hold_within_tolerance_over_10000_robots():
    plan = make_plan(phases=[{"percent": 1}, {"percent": 10}, {"percent": 50}, {"percent": 100}])
    phases = [phase_of(plan, r) for r in IDS]
    cumulative = [sum(1 for p in phases if p is not None and p <= k) for k in range(4)]
    # Binomial(10000, p): 4 standard deviations is at most 200 robots at p = 0.5.
    for share, got in zip((0.01, 0.10, 0.50, 1.0), cumulative):
        sd = (10_000 * share * (1 - share)) ** 0.5
        assert abs(got - 10_000 * share) <= 4 * sd + 1, (share, got)
    assert cumulative[-1] == 10_000


def test_another_rollout_picks_other_robots_first():
    one = make_plan(phases=[{"percent": 10}], offline_max_phase=0)
    other = make_plan(rollout_id="app-2.1.0", phases=[{"percent": 10}], offline_max_phase=0)
    first = {r for r in IDS if phase_of(one, r) == 0}
    second = {r for r in IDS if phase_of(other, r) == 0}
    assert 0.05 < len(first & second) / len(first) < 0.2  # independent: about 10 % overlap


def test_named_robots_are_in_their_phase_whatever_their_hash_and_phases_are_cumulative():
    plan = make_plan()  # a1, b1 named in phase 0; then 50 %, then 100 %
    assert phase_of(plan, "a1") == 0 and phase_of(plan, "b1") == 0
    raised = make_plan(phases=[{"percent": 20}, {"percent": 60}, {"percent": 100}])
    for robot in IDS[:500]:  # a robot never leaves a phase it was in when a later phase opens
        assert phase_of(raised, robot) == next(k for k, p in enumerate((20, 60, 100)) if cohort_point(raised.rollout_id, robot) * 100 < p)


def test_a_robot_outside_the_open_phases_gets_nothing():
    plan = make_plan()
    later = next(r for r in IDS if phase_of(plan, r) == 2)
    got = assignment(plan, later, "1.0.0", opened_phases=2)
    assert got.version is None and got.phase == 2 and "phase 2 has not started" in got.reason
    assert assignment(plan, later, "1.0.0", opened_phases=3).version == "2.0.0"
    assert assignment(plan, "a1", "1.0.0", opened_phases=1).version == "2.0.0"


def test_a_robot_that_was_away_gets_what_the_plan_assigns():
    """Back after the rollout's phases opened, it is offered the plan's version whatever is newest elsewhere."""
    plan = make_plan(**{"from": ["1.0.0", "1.1.0"]})
    robot = next(r for r in IDS if phase_of(plan, r) == 1)
    assert assignment(plan, robot, "1.1.0", opened_phases=3).version == "2.0.0"


def test_robots_not_on_a_from_version_are_not_targeted():
    plan = make_plan()
    got = assignment(plan, "a1", "0.9.0", opened_phases=3)
    assert got.version is None and "0.9.0 is not one the plan moves from" in got.reason
    assert assignment(plan, "a1", None, opened_phases=3).version is None
    assert assignment(make_plan(**{"from": []}), "a1", None, opened_phases=1).version == "2.0.0"


def test_a_plan_without_from_never_pulls_a_newer_robot_down_to_its_target():
    """`from` left empty means every robot below the target: a robot already on 3.0.0 is not
    offered 2.0.0 by a plan for 2.0.0 (a gateway serving it would block the robot's next release)."""
    plan = make_plan(**{"from": []})
    for newer in ("3.0.0", "2.0.1", "10.0.0"):
        got = assignment(plan, "a1", newer, opened_phases=3)
        assert got.version is None and f"{newer} is not one the plan moves from" in got.reason
    assert assignment(plan, "a1", "2.0.0-rc.1", opened_phases=3).version == "2.0.0"
    assert assignment(plan, "a1", "1.9.9", opened_phases=3).version == "2.0.0"


def test_paused_and_halted_robots_keep_what_they_have():
    paused = make_plan(state="paused")
    for current in ("1.0.0", "2.0.0"):
        got = assignment(paused, "a1", current, 3, came_from="1.0.0")
        assert got.version is None and "paused" in got.reason
    pause_plan = make_plan(on_halt="pause")
    assert assignment(pause_plan, "a1", "1.0.0", 3, halted=True).version is None


def test_an_abort_with_on_halt_rollback_returns_exactly_the_robots_on_the_target():
    plan = make_plan(state="aborted", on_halt="rollback")
    back = assignment(plan, "a1", "2.0.0", 1, came_from="1.0.0")
    assert (back.version, back.rollback) == ("1.0.0", True)
    assert assignment(plan, "b1", "1.0.0", 1, came_from=None).version is None  # never had it: stays
    assert assignment(plan, "a1", "2.0.0", 1, came_from="0.5.0").version is None  # not a 'from' version
    assert assignment(plan, "a1", "2.0.0", 1, came_from=None).version is None  # unknown: no guess
    local = assignment(make_plan(on_halt="rollback"), "a1", "2.0.0", 1, halted=True, came_from="1.0.0")
    assert local.version == "1.0.0" and local.rollback


def test_the_robot_refuses_a_version_the_plan_does_not_assign():
    plan = make_plan()
    later = next(r for r in IDS if phase_of(plan, r) == 2)
    assert may_install(plan, "a1", "1.0.0", 1, "2.0.0").version == "2.0.0"
    refused = may_install(plan, later, "1.0.0", 1, "2.0.0")
    assert refused.version is None and "2.0.0 is not assigned to" in refused.reason
    assert may_install(plan, "a1", "1.0.0", 3, "3.0.0").version is None  # a version outside the plan
