"""`otad-release rollout {create,status,pause,resume,approve,abort}`: the operator's side of the admin API.

Talks to the dashboard's /api/rollouts with an operator token (the whole
--token-file, like a daemon's own token) through otad's one HTTP client and its
TLS options. Exit 0 with one line on stdout, or 1 with one line on stderr
(the dashboard's own one-line error when it refused); `status --json` prints
the dashboard's status document.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import requests

from otad.errors import OtadError, TransportError
from otad.rollout.plan import MAX_PLAN_BYTES
from otad.telemetry.tokens import read_own_token
from otad.transfer.client import HttpClient, TransferLimits, _transport_error
from otad.transfer.tls import ClientTls

API = "/api/rollouts"


class RolloutCommandError(OtadError):
    """The dashboard refused, or could not be asked."""


def add_rollout_parser(sub: Any, parser_class: type) -> None:
    rollout = sub.add_parser("rollout", help="create and steer staged rollouts at the dashboard")
    actions = rollout.add_subparsers(dest="action", required=True, parser_class=parser_class)
    p = actions.add_parser("create", help="create a rollout from a JSON file of plan fields (no revision)")
    p.add_argument("plan_file", metavar="PLAN.json")
    p = actions.add_parser("status", help="a rollout's phases, counts per site and halts (no id: every rollout)")
    p.add_argument("rollout_id", nargs="?")
    p.add_argument("--json", action="store_true", help="print the dashboard's status document")
    for action, text in (("pause", "pause (robots keep what they have)"), ("resume", "resume a paused rollout"),
                         ("approve", "approve the next phase (or --phase N)"), ("abort", "abort (final)")):
        p = actions.add_parser(action, help=text)
        p.add_argument("rollout_id")
        p.add_argument("--reason", help="one line recorded in the signed revision")
        if action == "approve":
            p.add_argument("--phase", type=int, help="the phase index to approve (default: the next)")
    for p in actions.choices.values():
        p.add_argument("--dashboard", required=True, metavar="URL", help="the dashboard's base URL")
        p.add_argument("--token-file", required=True, type=Path, metavar="FILE", help="file holding your operator token")
        p.add_argument("--ca-file", type=Path, help="CA bundle that signed the dashboard's certificate (default: system)")
        p.add_argument("--client-cert", type=Path, help="client certificate (PEM) for mutual TLS")
        p.add_argument("--client-key", type=Path, help="its private key (PEM)")
        p.set_defaults(handler=cmd_rollout)


def cmd_rollout(args: argparse.Namespace) -> int:
    client = HttpClient(args.dashboard, TransferLimits(min_rate=0),
                        headers={"Authorization": f"Bearer {read_own_token(args.token_file)}"},
                        tls=ClientTls(args.ca_file, args.client_cert, args.client_key))
    try:
        if args.action == "create":
            reply = _call(client, "POST", API, _plan_fields(args.plan_file))
            print(f"created rollout {reply['rollout_id']} revision {reply['revision']} ({reply['state']})")
        elif args.action == "status":
            reply = _call(client, "GET", f"{API}/{args.rollout_id}" if args.rollout_id else API)
            print(json.dumps(reply, indent=1, sort_keys=True) if args.json else describe(reply))
        else:
            body: dict[str, Any] = {"reason": args.reason} if args.reason else {}
            if args.action == "approve" and args.phase is not None:
                body["phase"] = args.phase
            reply = _call(client, "POST", f"{API}/{args.rollout_id}/{args.action}", body)
            print(f"rollout {reply['rollout_id']} revision {reply['revision']}: {reply['state']}")
    finally:
        client.close()
    return 0


def _plan_fields(path: str) -> dict:
    try:
        data = Path(path).read_bytes()[:MAX_PLAN_BYTES + 1]
        doc = json.loads(data)
    except OSError as exc:
        raise RolloutCommandError(f"{path}: cannot read ({exc.strerror})") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RolloutCommandError(f"{path}: not valid JSON") from None
    if not isinstance(doc, dict):
        raise RolloutCommandError(f"{path}: must hold a JSON object of plan fields")
    return doc


def _call(client: HttpClient, method: str, path: str, body: Any = None) -> dict:
    url = client.url(path)
    try:
        response = client.session.request(
            method, url, data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"} if body is not None else {}, allow_redirects=False,
            timeout=(client.limits.connect_timeout, client.limits.read_timeout), **client.tls_options)
    except requests.RequestException as exc:
        raise TransportError(str(_transport_error(url, exc, method))) from None
    with response:
        try:
            reply = response.json()
        except ValueError:
            reply = None
    if response.status_code >= 400 or not isinstance(reply, dict):
        why = reply.get("error") if isinstance(reply, dict) else None
        raise RolloutCommandError(f"{method} {url}: HTTP {response.status_code}: {str(why or 'no JSON answer')[:300]}")
    return reply


def describe(status: dict) -> str:
    """Status in a few lines for a terminal (--json has everything)."""
    if "rollouts" in status:
        rows = [f"{r['rollout_id']} revision {r['revision']} {r['state']} -> {r['version']}" for r in status["rollouts"]]
        return "\n".join(rows) or "no rollouts"
    lines = [f"{status['rollout_id']} revision {status['revision']} {status['state']} -> {status['version']}"
             + (f" ({status['reason']})" if status["reason"] else "")]
    for phase in status["phases"]:
        lines.append(f"  phase {phase['index']}: targeted {phase['targeted']} waiting {phase['waiting']} "
                     f"installing {phase['installing']} committed {phase['committed']} failed {phase['failed']}"
                     + (" HALTED" if phase["halted"] else ""))
    for halt in status["halts"]:
        lines.append(f"  halt ({halt['scope']}) phase {halt['phase']} at {halt['at']:.0f}: {halt['reason']}"
                     + (f" [sites {', '.join(halt['sites'])}]" if halt["sites"] else ""))
    return "\n".join(lines)
