"""The rollout routes of the dashboard's WSGI app: gateways' wires and the operators' admin API.

- `GET /rollouts.json` (Wire 1, no token: everything in it is signed): the latest
  revision of every current plan.
- `GET /rollouts` and `/rollouts/<id>`: the console pages (rollout_page.py), readable
  without a token like /status; their buttons call the admin API with one.
- `POST /rollouts/site-report` (Wire 4, a gateway token): what a site decided.
- The admin API, operator tokens only (OPERATOR_TOKENS_FILE; a gateway token is
  not one): `GET /api/rollouts`, `POST /api/rollouts` (create),
  `GET /api/rollouts/<id>` (status), `POST /api/rollouts/<id>/<action>` with
  action pause | resume | approve | abort.

Bodies are JSON objects of at most MAX_ADMIN_BODY bytes with no duplicate keys;
every refusal is a 4xx with a one-line JSON error, and changes nothing.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from otad.dashboard.ingest import IngestError, authenticate
from otad.dashboard.rollout_page import render_rollout, render_rollouts
from otad.dashboard.rollouts import ACTIONS, RolloutDesk, RolloutError
from otad.strictjson import loads_strict
from otad.telemetry.tokens import TokenTable

MAX_ADMIN_BODY = 64 * 1024
API = "/api/rollouts"

Respond = Callable[..., Iterable[bytes]]  # (code, body dict or an HTML page's bytes, extra headers) -> WSGI body


def is_rollout_route(path: str) -> bool:
    return path in ("/rollouts", "/rollouts.json", API) or path.startswith(("/rollouts/", API + "/"))


def route(desk: RolloutDesk, gateways: TokenTable | None, method: str, path: str, environ: dict,
          respond: Respond) -> Iterable[bytes]:
    now = time.time()
    try:
        if path == "/rollouts.json":
            _allow(method, "GET", "HEAD")
            return respond(200, desk.served(now), [("Cache-Control", "no-store")])
        if path == "/rollouts/site-report":
            _allow(method, "POST")
            gateway = authenticate(gateways, environ.get("HTTP_AUTHORIZATION"))
            desk.site_report(gateway, read_json(environ))
            return respond(200, {"ok": True}, [])
        if path == "/rollouts" or path.startswith("/rollouts/"):
            _allow(method, "GET", "HEAD")
            tail = path[len("/rollouts/"):] if path != "/rollouts" else ""
            if "/" in tail:
                raise RolloutError("not found", 404)
            page = render_rollout(desk.status(tail, now)) if tail else render_rollouts(desk.overview(now))
            return respond(200, page, [("Cache-Control", "no-store")])
        operator = _operator(desk.operators, environ)
        parts = path[len(API):].strip("/").split("/") if path != API else []
        if not parts:
            _allow(method, "GET", "POST")
            if method == "POST":
                created = desk.create(read_json(environ), f"operator {operator}", now)
                return respond(201, {"rollout_id": created.rollout_id, "revision": created.revision, "state": created.state}, [])
            return respond(200, {"rollouts": desk.overview(now)}, [("Cache-Control", "no-store")])
        if len(parts) == 1:
            _allow(method, "GET", "HEAD")
            return respond(200, desk.status(parts[0], now), [("Cache-Control", "no-store")])
        if len(parts) == 2 and parts[1] in ACTIONS:
            _allow(method, "POST")
            revised = desk.act(parts[0], parts[1], read_json(environ, empty={}), f"operator {operator}", now)
            return respond(200, {"rollout_id": revised.rollout_id, "revision": revised.revision, "state": revised.state}, [])
        raise RolloutError("not found", 404)
    except _MethodNotAllowed as exc:
        return respond(405, {"error": f"method {method[:20]} is not allowed here"}, [("Allow", exc.allowed)])
    except IngestError as exc:
        extra = [("WWW-Authenticate", "Bearer")] if exc.status == 401 else []
        return respond(exc.status, {"error": str(exc)}, extra)
    except RolloutError as exc:
        return respond(exc.status, {"error": str(exc)}, [])


class _MethodNotAllowed(Exception):
    def __init__(self, allowed: str) -> None:
        self.allowed = allowed


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise _MethodNotAllowed(", ".join(allowed))


def _operator(operators: TokenTable | None, environ: dict) -> str:
    if operators is None:
        raise RolloutError("the rollout admin API is disabled: OPERATOR_TOKENS_FILE is not set", 401)
    try:
        return authenticate(operators, environ.get("HTTP_AUTHORIZATION"))
    except IngestError:
        raise IngestError("missing or wrong operator token (a gateway token is not one)", 401) from None


def read_json(environ: dict, empty: Any = None) -> Any:
    """The request body as JSON: bounded, Content-Length required, duplicate keys refused.
    `empty`: what an empty body means (None: an empty body is refused)."""
    if empty is not None and not environ.get("CONTENT_LENGTH"):
        return empty
    body = read_body(environ)
    if not body and empty is not None:
        return empty
    return loads_strict(body, RolloutError, "body")


def read_body(environ: dict, limit: int = MAX_ADMIN_BODY) -> bytes:
    """The request body's bytes: Content-Length required (411), at most `limit` (413, before reading)."""
    length = environ.get("CONTENT_LENGTH") or ""
    if not length.isdigit():
        raise RolloutError("Content-Length required", 411)
    if int(length) > limit:
        raise RolloutError(f"body is larger than {limit} bytes", 413)
    return environ["wsgi.input"].read(int(length))
