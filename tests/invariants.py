"""The robot's safety invariant, written once and checked everywhere.

"A robot must never end in a broken state": CURRENT resolves to a complete
release (its completion marker exists, its VERSION file names it), or does
not exist at all on a robot that never committed a release.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def current_problem(app_dir: Path, allow_none: bool = False) -> str | None:
    """None if CURRENT is sound, else a description of what is wrong."""
    link = app_dir / "CURRENT"
    if not os.path.lexists(link):
        return None if allow_none else "CURRENT does not exist"
    try:
        target = os.readlink(link)
    except OSError as exc:
        return f"CURRENT unreadable: {exc}"
    head, _, version = target.partition("/")
    if head != "releases" or not version or "/" in version:
        return f"CURRENT points outside releases/: {target}"
    release = app_dir / "releases" / version
    if not (app_dir / "releases" / f"{version}.ok").is_file():
        return f"CURRENT -> {version}, which has no completion marker"
    try:
        found = (release / "VERSION").read_text().strip()
    except OSError:
        return f"CURRENT -> {version}, which has no VERSION file"
    if found != version:
        return f"CURRENT -> {version}, whose VERSION says {found}"
    return None


def current_version(app_dir: Path) -> str | None:
    try:
        return os.readlink(app_dir / "CURRENT").partition("/")[2]
    except OSError:
        return None


def robot_state(state_dir: Path) -> dict:
    return json.loads((state_dir / "state.json").read_text())


def committed_and_sound(app_dir: Path, state_dir: Path) -> str | None:
    """After recovery: CURRENT is sound and it is the committed release."""
    problem = current_problem(app_dir, allow_none=True)
    if problem:
        return problem
    state = robot_state(state_dir)
    if state["phase"] in ("idle", "probation") and state["committed"] != current_version(app_dir):
        return f"CURRENT is {current_version(app_dir)} but the committed release is {state['committed']}"
    return None
