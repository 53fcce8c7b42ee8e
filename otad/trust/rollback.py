"""Anti-rollback: may a robot install, or a gateway follow, this version? A pure decision on versions.

The robot's floor is the higher of CURRENT and the highest version it has
ever committed (persisted in its state.json); the gateway's is the highest
version it has verified (gateway/floor.py). A version below the floor is
taken only if the verified manifest says `allow_downgrade: true` (the release
signer authorises going down to exactly that version) and the robot's own
ALLOW_DOWNGRADE setting does not forbid it. So a gateway, or anyone on
edge_net or wan_net, replaying an old but validly signed release cannot take a
robot or a site back to it. `otadctl rollback` is the operator's local hand and
does not go through here (see docs/operations.md).

An allow_downgrade manifest can itself be replayed while it has not expired.
Where the caller knows when the newest manifest it accepted was created
(`newest_created`, the gateway does), a downgrade manifest created before that
is refused: it was signed before a release the caller has since taken, so it
is a replay, not the signer's latest word.
"""
from __future__ import annotations

from dataclasses import dataclass

from otad.errors import TrustError
from otad.semver import Version, same_version, version_in
from otad.trust.manifest import utc_timestamp

HIGHEST_COMMITTED = "the highest committed version"


class RollbackRefused(TrustError):
    """A signed release below the anti-rollback floor, without a (fresh) signed authorisation."""


@dataclass(frozen=True)
class InstallDecision:
    install: bool
    reason: str
    quiet: bool = False  # nothing worth logging (already CURRENT, blacklisted)
    downgrade: bool = False  # an authorised downgrade: the floor moves down to it


def decide_install(
    candidate: str,
    current: str | None,
    highest_committed: str | None,
    blacklist: list[str] | tuple[str, ...] = (),
    signed_allow_downgrade: bool = False,
    robot_allows_downgrade: bool = True,
    *,
    highest_is: str = HIGHEST_COMMITTED,
    created: float | None = None,
    newest_created: float | None = None,
) -> InstallDecision:
    """`highest_is` names the floor in reasons; `created` (the candidate manifest's) and
    `newest_created` (of the newest manifest accepted so far) bound downgrade replays."""
    if version_in(candidate, blacklist):
        return InstallDecision(False, f"{candidate} is blacklisted", quiet=True)
    if same_version(candidate, current):
        return InstallDecision(False, f"{candidate} is CURRENT", quiet=True)
    floor, what = _floor(current, highest_committed, highest_is)
    if floor is None or Version(candidate) >= floor:
        return InstallDecision(True, "newer" if floor is not None else "first release")
    below = f"{candidate} is lower than {what} {floor}"
    if not signed_allow_downgrade:
        return InstallDecision(False, f"{below} and the signed manifest does not allow a downgrade")
    if created is not None and newest_created is not None and created < newest_created:
        return InstallDecision(False, f"{below}; the manifest allows a downgrade but was created at {utc_timestamp(created)}, "
                                      f"before the newest manifest accepted so far ({utc_timestamp(newest_created)}): a replay")
    if not robot_allows_downgrade:
        return InstallDecision(False, f"{below}; the manifest allows a downgrade but ALLOW_DOWNGRADE=no")
    return InstallDecision(True, f"{below}; downgrade authorised by the signed manifest", downgrade=True)


def _floor(current: str | None, highest: str | None, highest_is: str) -> tuple[Version | None, str]:
    cur = Version(current) if current else None
    high = Version(highest) if highest else None
    if high is not None and (cur is None or high > cur):
        return high, highest_is
    return cur, "CURRENT"


def next_floor(highest_committed: str | None, committed: str, downgrade: bool) -> str:
    """highest_committed after committing `committed`; an authorised downgrade resets it."""
    if downgrade or highest_committed is None or Version(committed) > Version(highest_committed):
        return committed
    return highest_committed
