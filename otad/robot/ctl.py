"""`otadctl`: the operator's view of, and hand on, a robot's releases.

Reads the same /etc/otad/robot.conf as otad-robot. `status` only reads state
files (always safe); `rollback` and `unblacklist` take the state lock without
waiting, so they refuse, rather than race, while the daemon changes releases.
`unblacklist` also works while a release is on probation (every state write is
a locked read-modify-write of the fields it changes, so the daemon's end of
probation keeps it); `rollback` waits for the robot to be idle.
A manual rollback also blacklists the version rolled back from: otherwise the
daemon would install it again at its next poll.
"""
from __future__ import annotations

import json
import sys

from otad.cli import ArgumentParser, run
from otad.config import load_settings
from otad.errors import OtadError
from otad.robot.installer import Installer
from otad.robot.orchestrate import load_state
from otad.robot.outbox import Outbox
from otad.robot.settings import DEFAULT_CONFIG, RobotSettings
from otad.robot.state import Busy, StateStore

PROG = "otadctl"


def _open(args):
    settings = load_settings(RobotSettings, args.config, required=args.config != DEFAULT_CONFIG)
    store = StateStore(settings.state_dir)
    installer = Installer(settings, store, Outbox(settings.state_dir))
    return settings, installer


def cmd_status(args) -> int:
    settings, installer = _open(args)
    state, app = installer.state, installer.app
    try:
        last_poll = (settings.state_dir / "last_poll").read_text().strip() or None
    except OSError:
        last_poll = None
    try:
        update = load_state(settings.state_dir)["update"] or None
    except OtadError as exc:
        update = f"unknown ({exc})"
    doc = {
        "update": update,
        "current": app.target("CURRENT"), "old": app.target("OLD"), "new": app.target("NEW"),
        "phase": state.phase, "target": state.target, "blacklist": list(state.blacklist),
        "attempts": dict(state.attempts), "last_failure": state.last_failure, "last_poll": last_poll,
    }
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    print(f"current:   {doc['current'] or '-'}")
    print(f"old:       {doc['old'] or '-'}")
    print(f"new:       {doc['new'] or '-'}")
    print(f"phase:     {state.phase}" + (f" ({state.target})" if state.target else ""))
    print(f"blacklist: {', '.join(state.blacklist) or '-'}")
    failure = state.last_failure
    print(f"last failure: {failure['version']} at {failure['at']}: {failure['reason']}" if failure else "last failure: -")
    print(f"last poll: {last_poll or '-'}")
    print(f"update:    {update or '-'}")
    return 0


def _locked(installer: Installer, what: str) -> None:
    try:
        installer.lock.acquire(wait=False)
    except Busy:
        state = installer.store.load()
        raise Busy(f"otad-robot is busy ({state.phase} {state.target or ''}); cannot {what} now, try again shortly") from None
    installer.state = installer.store.load()


def cmd_rollback(args) -> int:
    _, installer = _open(args)
    _locked(installer, "roll back")
    try:
        state, app = installer.state, installer.app
        if state.phase != "idle":
            raise OtadError(f"otad-robot is in phase {state.phase}; wait until it is idle")
        current, old = app.target("CURRENT"), app.target("OLD")
        if old is None or old == current or not app.is_complete(old):
            raise OtadError(f"there is no OLD release to roll back to (CURRENT is {current or 'none'}"
                            f"{', OLD points at it too' if old is not None and old == current else ''})")
        # Same path as an automatic rollback: CURRENT -> OLD by rename, restart, record.
        installer.save(previous=old, previous_old=None)
        installer.rollback(current, "manual rollback (otadctl)")
        state = installer.store.load()
        if current not in state.blacklist:
            installer.save(blacklist=[*state.blacklist, current])
    finally:
        installer.lock.release()
    print(f"rolled back from {current} to {old}; {current} is blacklisted until `otadctl unblacklist {current}`")
    return 0


def cmd_unblacklist(args) -> int:
    _, installer = _open(args)
    _locked(installer, "unblacklist")
    try:
        state = installer.state
        if args.version not in state.blacklist:
            raise OtadError(f"{args.version} is not blacklisted")
        # Applied at once, on probation too: the daemon writes only the fields it changes.
        installer.save(blacklist=[v for v in state.blacklist if v != args.version],
                       attempts={v: n for v, n in state.attempts.items() if v != args.version},
                       interrupted={v: n for v, n in state.interrupted.items() if v != args.version})
    finally:
        installer.lock.release()
    print(f"{args.version} may be installed again")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog=PROG, description="Inspect and steer otad-robot's releases.")
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    p = sub.add_parser("status", help="CURRENT, OLD, NEW, phase, blacklist, last failure, last poll")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_status)
    p = sub.add_parser("rollback", help="switch CURRENT back to OLD (and blacklist the version left)")
    p.set_defaults(handler=cmd_rollback)
    p = sub.add_parser("unblacklist", help="allow a blacklisted version again")
    p.add_argument("version")
    p.set_defaults(handler=cmd_unblacklist)
    args = parser.parse_args(argv)
    return run(PROG, lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
