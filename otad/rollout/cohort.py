"""Cohorts: which phase a robot belongs to, and what it may install now.

A robot's place in a rollout is a hash of (rollout_id, robot_id) mapped to
[0, 1): the dashboard, every gateway and the robot itself compute the same
number without talking, and a new rollout_id reshuffles who goes first.
Phase k holds the robots named in phases 0..k plus the targeted robots whose
point is below phase k's `percent` / 100: percentages are cumulative, so a
robot never leaves a phase it was in. A robot's phase is the first that holds it.

"Targeted" is the plan's `from` list; when it is empty, every robot below the
target (never one already above it: no plan pulls a robot down to its target).
A robot on another version is not part of the rollout, except that one already
on the target stays in its phase (it is where the rollout put it).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from otad.errors import MalformedMetadata
from otad.rollout.plan import Plan
from otad.semver import parse_version, same_version, version_in

_DOMAIN = b"otad-rollout-cohort-v1\0"


@dataclass(frozen=True)
class Assignment:
    version: str | None  # what the robot may install now; None: nothing
    phase: int | None  # the robot's phase, None when it is in none
    reason: str
    rollback: bool = False  # `version` takes the robot back from the target (on_halt=rollback)


def cohort_point(rollout_id: str, robot_id: str) -> float:
    """A uniform, deterministic point in [0, 1) for this robot in this rollout."""
    # NUL separates the fields: ids cannot hold it, so ("ab", "c") and ("a", "bc") differ.
    digest = hashlib.sha256(_DOMAIN + rollout_id.encode() + b"\0" + robot_id.encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53)  # 53 bits: exact as a float


def phase_of(plan: Plan, robot_id: str) -> int | None:
    """The first phase that holds this robot (named, or under the percentage), or None."""
    point: float | None = None
    for n, phase in enumerate(plan.phases):
        if robot_id in phase.robots:
            return n
        if phase.percent > 0:
            if point is None:
                point = cohort_point(plan.rollout_id, robot_id)
            if point * 100 < phase.percent:
                return n
    return None


def is_targeted(plan: Plan, current_version: str | None) -> bool:
    """Is a robot on `current_version` one the plan moves (or has moved) to its target?"""
    if same_version(current_version, plan.version):
        return True
    if not plan.from_versions:
        # "Every robot" means every robot below the target: a plan with no `from` must not
        # pull a robot that already runs a newer release back down to it.
        return current_version is None or _below(current_version, plan.version)
    return current_version is not None and version_in(current_version, plan.from_versions)


def _below(current_version: str, target: str) -> bool:
    try:
        return parse_version(current_version) < parse_version(target)
    except MalformedMetadata:  # a version this build cannot order is not one to move
        return False


def assignment(plan: Plan, robot_id: str, current_version: str | None, opened_phases: int, *,
               halted: bool = False, came_from: str | None = None) -> Assignment:
    """What `robot_id`, now on `current_version`, may install under `plan`.

    `opened_phases`: how many phases have started where this robot is served
    (phases open in order: 0 .. opened_phases-1). `halted`: the site stopped on
    its own criteria; it acts as the plan's `on_halt`, as an abort or pause does.
    `came_from`: the version the robot ran before the target, which a rollback
    returns it to (only when the plan lists it in `from`, or lists none).
    """
    phase = phase_of(plan, robot_id)
    if not is_targeted(plan, current_version):
        return Assignment(None, None, f"{current_version or 'no version'} is not one the plan moves from")
    if phase is None:
        return Assignment(None, None, f"{robot_id} is in no phase of rollout {plan.rollout_id}")
    stopped = "aborted" if plan.state == "aborted" else "paused" if plan.state == "paused" else "halted at this site" if halted else None
    if stopped is not None:
        if plan.on_halt == "rollback" and plan.state != "paused" and same_version(current_version, plan.version):
            return _rollback(plan, phase, stopped, came_from)
        return Assignment(None, phase, f"rollout {plan.rollout_id} is {stopped}: robots keep what they have")
    if same_version(current_version, plan.version):
        return Assignment(None, phase, f"already on {plan.version}")
    if phase >= opened_phases:
        return Assignment(None, phase, f"phase {phase} has not started (phases started: {opened_phases})")
    return Assignment(plan.version, phase, f"phase {phase} of rollout {plan.rollout_id} assigns {plan.version}")


def _rollback(plan: Plan, phase: int, stopped: str, came_from: str | None) -> Assignment:
    if came_from is None or same_version(came_from, plan.version):
        return Assignment(None, phase, f"rollout {plan.rollout_id} is {stopped}, but the version to return to is unknown")
    if plan.from_versions and not version_in(came_from, plan.from_versions):
        return Assignment(None, phase, f"rollout {plan.rollout_id} is {stopped}, but {came_from} is not one of its 'from' versions")
    return Assignment(came_from, phase, f"rollout {plan.rollout_id} is {stopped}: back to {came_from}", rollback=True)


def may_install(plan: Plan, robot_id: str, current_version: str | None, opened_phases: int, offered: str, *,
                halted: bool = False, came_from: str | None = None) -> Assignment:
    """The robot's check on what its gateway offers: refused (version None) unless the plan assigns exactly it."""
    allowed = assignment(plan, robot_id, current_version, opened_phases, halted=halted, came_from=came_from)
    if allowed.version is None or not same_version(allowed.version, offered):
        return Assignment(None, allowed.phase, f"{offered} is not assigned to {robot_id}: {allowed.reason}")
    return allowed
