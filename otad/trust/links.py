"""The one rule for a symlink inside a release, shared by `otad-release build` and the robot's unpacker.

A link may climb only with leading `..`, no higher than its own folder's depth,
then go down through names. If every link of a release obeys this and each sits
in a real folder (the unpacker refuses writes through links), following any of
them lands inside the release, whatever the other links point at: the rule
needs no list of links kept until the end. A `..` after a name could climb out
through a link (`sub/up` -> `..`, then `esc` -> `sub/up/..` is the release's
parent on disk, though it reads as `sub`).
"""
from __future__ import annotations


def symlink_target_problem(name: str, target: str) -> str | None:
    """Why the link `name` (a normalised path inside the release) -> `target` is refused, or None."""
    if not target or "\0" in target:
        return "symlink target is empty or holds a NUL byte"
    if target.startswith("/"):
        return f"symlink to absolute path {target[:80]!r}"
    parts = [part for part in target.split("/") if part not in ("", ".")]
    climb = next((n for n, part in enumerate(parts) if part != ".."), len(parts))
    if ".." in parts[climb:]:
        return f"symlink target {target[:80]!r} has '..' after a name ('..' only at its start)"
    if climb > name.count("/"):
        return f"symlink target {target[:80]!r} leaves the release folder"
    return None
