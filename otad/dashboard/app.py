"""The dashboard's WSGI application, OTA half: /manifest, /releases/<version>/manifest, /ota/<file>, /healthz.

Status and headers for every file come from otad.transfer.http.plan_response
(the same rules as the gateway); this module only routes and moves bytes.
Every error is a one-line JSON body; no exception escapes to the server.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from typing import Any, BinaryIO

from otad import __version__
from otad.dashboard import admin
from otad.dashboard.admin import is_rollout_route, read_body
from otad.dashboard.ingest import MAX_WIRE_BYTES, IngestError, authenticate, decode_body, parse_forwarded
from otad.dashboard.ota import OtaFolder, Published
from otad.dashboard.site_view import SITE_VIEW_PATH, receive, site_views
from otad.dashboard.status import fleet_status, render_status
from otad.dashboard.rollouts import RolloutDesk, RolloutError
from otad.dashboard.store import TelemetryStore
from otad.telemetry.tokens import TokenTable
from otad.errors import MalformedMetadata
from otad.orchestration.snapshot import MAX_SNAPSHOT_BYTES, SnapshotError
from otad.semver import Version
from otad.transfer.files import open_inside, safe_file_name
from otad.transfer.http import Plan, Validators, plan_response, stat_etag

log = logging.getLogger("otad.dashboard")

CHUNK = 256 * 1024
ALLOW = "GET, HEAD"
MANIFEST_ROUTES = ("/manifest", "/ota/manifest.json")
# The manifest's signature, from the same in-memory pair as /manifest (never from disk alone).
MANIFEST_BUNDLE_ROUTES = ("/manifest.bundle", "/ota/manifest.json.bundle")
OTA_PREFIX = "/ota/"
# Each published version's own pair (OTA_DIR/releases/<version>/), for gateways whose rollout
# plans assign a release that is no longer the newest (docs/formats.md).
RELEASES_PREFIX = "/releases/"
RELEASE_ROUTES = {"manifest": False, "manifest.bundle": True}  # tail -> is the bundle
_CONTENT_TYPES = {".json": "application/json", ".sha256": "text/plain; charset=us-ascii", ".gz": "application/gzip"}

StartResponse = Callable[..., Any]
Environ = dict[str, Any]


class RequestHeaders:
    """The `.get(name)` view of a WSGI environ that plan_response expects."""

    def __init__(self, environ: Environ) -> None:
        self._environ = environ

    def get(self, name: str) -> str | None:
        return self._environ.get("HTTP_" + name.upper().replace("-", "_"))


class FileSpan:
    """`length` bytes of an open file from its current position, in bounded chunks."""

    def __init__(self, stream: BinaryIO, length: int) -> None:
        self._stream = stream
        self._remaining = length

    def __iter__(self) -> Iterator[bytes]:
        while self._remaining > 0:
            data = self._stream.read(min(CHUNK, self._remaining))
            if not data:
                return
            self._remaining -= len(data)
            yield data

    def close(self) -> None:
        self._stream.close()


class Telemetry:
    """The telemetry half: the store, and the gateways' tokens (swapped on SIGHUP)."""

    def __init__(self, store: TelemetryStore, tokens: TokenTable | None) -> None:
        self.store = store
        self.tokens = tokens


class DashboardApp:
    """A WSGI callable. `ota` may be swapped for another OtaFolder at any time (SIGHUP)."""

    def __init__(self, ota: OtaFolder, telemetry: Telemetry, rollouts: RolloutDesk | None = None) -> None:
        self.ota = ota
        self.telemetry = telemetry
        self.rollouts = rollouts

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "") or "/"
        try:
            return self._route(method, path, environ, start_response)
        except Exception as exc:
            log.error("%s %s failed: %s: %s", method, path[:200], type(exc).__name__, exc)
            # exc_info lets start_response be called again if the handler had already called it.
            return _json(start_response, 500, {"error": "internal error"}, method, exc_info=sys.exc_info())

    def _route(self, method: str, path: str, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if self.rollouts is not None and is_rollout_route(path):
            return admin.route(self.rollouts, self.telemetry.tokens, method, path, environ,
                               lambda code, body, extra: _respond(start_response, code, body, method, extra))
        if path == "/metrics":
            if method != "POST":
                return _json(start_response, 405, {"error": "use POST"}, method, [("Allow", "POST")])
            return self._metrics(environ, start_response)
        if path == SITE_VIEW_PATH:
            if method != "POST":
                return _json(start_response, 405, {"error": "use POST"}, method, [("Allow", "POST")])
            return self._site_view(environ, start_response)
        if path in ("/status", "/status.json") and method in ("GET", "HEAD"):
            document = fleet_status(self.telemetry.store, time.time())
            document["site_orchestration"] = site_views(self.telemetry.store.site_views(), document["generated"])
            if self.rollouts is not None:
                document["rollouts"] = self.rollouts.overview(document["generated"], in_progress=True)
            if path == "/status.json":
                return _json(start_response, 200, document, method, [("Cache-Control", "no-store")])
            page = render_status(document)
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(page))),
                                      ("Cache-Control", "no-store")])
            return [] if method == "HEAD" else [page]
        if not (path in MANIFEST_ROUTES or path in MANIFEST_BUNDLE_ROUTES or path == "/healthz"
                or path.startswith((OTA_PREFIX, RELEASES_PREFIX))):
            return error_response(start_response, 404, "not found", method)
        if method not in ("GET", "HEAD"):
            body = {"error": f"method {method[:20]} is not allowed here"}
            return _json(start_response, 405, body, method, [("Allow", ALLOW)])
        if path == "/healthz":
            return self._healthz(method, start_response)
        if path in MANIFEST_ROUTES or path in MANIFEST_BUNDLE_ROUTES:
            return self._manifest(method, environ, start_response, bundle=path in MANIFEST_BUNDLE_ROUTES)
        if path.startswith(RELEASES_PREFIX):
            return self._release(method, path[len(RELEASES_PREFIX):], environ, start_response)
        return self._file(method, path[len(OTA_PREFIX):], environ, start_response)

    def _metrics(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        telemetry = self.telemetry
        try:
            gateway = authenticate(telemetry.tokens, environ.get("HTTP_AUTHORIZATION"))
            length = environ.get("CONTENT_LENGTH") or ""
            if not length.isdigit():
                raise IngestError("Content-Length required", 411)
            if int(length) > MAX_WIRE_BYTES:
                raise IngestError(f"body is larger than {MAX_WIRE_BYTES} bytes", 413)
            body = environ["wsgi.input"].read(int(length))
            data = decode_body(body, environ.get("HTTP_CONTENT_ENCODING"))
            report: dict = {}
            buffer_id, backlog, rows = parse_forwarded(data, gateway, report)
            acked = telemetry.store.ingest(gateway, buffer_id, backlog, rows, quarantined=report["quarantined"])
            if self.rollouts is not None:
                self.rollouts.evidence_stored(rows)
        except IngestError as exc:
            extra = [("WWW-Authenticate", "Bearer")] if exc.status == 401 else []
            return _json(start_response, exc.status, {"error": str(exc), **exc.extra}, "POST", extra)
        return _json(start_response, 200, {"acked": acked}, "POST")

    def _site_view(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        """POST /sites/orchestration: a gateway's orchestration snapshot (site_view.py)."""
        try:
            gateway = authenticate(self.telemetry.tokens, environ.get("HTTP_AUTHORIZATION"))
            receive(self.telemetry.store, gateway, read_body(environ, MAX_SNAPSHOT_BYTES))
        except IngestError as exc:
            return _json(start_response, exc.status, {"error": str(exc)}, "POST", [("WWW-Authenticate", "Bearer")])
        except (SnapshotError, RolloutError) as exc:
            return _json(start_response, exc.status, {"error": str(exc)}, "POST")
        return _json(start_response, 200, {"ok": True}, "POST")

    def _healthz(self, method: str, start_response: StartResponse) -> Iterable[bytes]:
        current = self.ota.current()
        release = current.manifest.version if current else None
        body = {"status": "ok", "version": __version__, "release": release}
        return _json(start_response, 200, body, method, [("Cache-Control", "no-store")])

    def _manifest(self, method: str, environ: Environ, start_response: StartResponse, bundle: bool = False) -> Iterable[bytes]:
        current = self.ota.current()
        if current is None:
            return error_response(start_response, 404, "no release published yet", method)
        return self._pair(current, method, environ, start_response, bundle)

    def _release(self, method: str, tail: str, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        """GET /releases/<version>/manifest[.bundle]: one published version's kept pair."""
        version, _, what = tail.partition("/")
        if what not in RELEASE_ROUTES:
            return error_response(start_response, 404, "not found (/releases/<version>/manifest or manifest.bundle)", method)
        try:
            Version(version)
        except MalformedMetadata:
            return error_response(start_response, 400, "not a release version (MAJOR.MINOR.PATCH[-suffix])", method)
        kept = self.ota.release(version)
        if kept is None:
            return error_response(start_response, 404, f"release {version} is not published here", method)
        return self._pair(kept, method, environ, start_response, RELEASE_ROUTES[what])

    def _pair(self, current: Published, method: str, environ: Environ, start_response: StartResponse,
              bundle: bool) -> Iterable[bytes]:
        data, validators = (current.bundle, current.bundle_validators) if bundle else (current.data, current.validators)
        if data is None or validators is None:
            return error_response(start_response, 404, "the published manifest is not signed (no manifest.json.bundle)", method)
        plan = plan_response(method, RequestHeaders(environ), validators)
        headers = [("Content-Type", "application/json"), ("Cache-Control", "no-cache"), *plan.headers]
        if plan.status in (200, 206):
            start_response(_status(plan.status), headers)
            return [] if method == "HEAD" else [data[plan.start:plan.start + plan.length]]
        return _planned_without_body(start_response, plan, headers, method)

    def _file(self, method: str, tail: str, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        name = safe_file_name(tail)
        opened = open_inside(self.ota.root, name) if name is not None else None
        if opened is None:
            return error_response(start_response, 404, "no such file", method)
        stream, st = opened
        try:
            validators = Validators(st.st_size, stat_etag(st.st_size, st.st_mtime_ns), int(st.st_mtime))
            plan = plan_response(method, RequestHeaders(environ), validators)
            headers = [("Content-Type", _content_type(name)), *plan.headers]
            if plan.status not in (200, 206):
                stream.close()
                return _planned_without_body(start_response, plan, headers, method)
            start_response(_status(plan.status), headers)
            if method == "HEAD":
                stream.close()
                return []
            return _file_body(environ, stream, plan, st.st_size)
        except BaseException:
            stream.close()
            raise


def _file_body(environ: Environ, stream: BinaryIO, plan: Plan, size: int) -> Iterable[bytes]:
    stream.seek(plan.start)
    wrapper = environ.get("wsgi.file_wrapper")
    # A file_wrapper may send up to EOF (PEP 3333 only says a server *should* stop at
    # Content-Length), so hand it only spans that end at EOF: whole files and the
    # open-ended ranges a resuming download asks for. Waitress stops at Content-Length.
    if wrapper is not None and plan.start + plan.length == size:
        return wrapper(stream, CHUNK)
    return FileSpan(stream, plan.length)


def _planned_without_body(start_response: StartResponse, plan: Plan, headers: list, method: str) -> Iterable[bytes]:
    """304 (headers only) or 416 (a JSON error next to plan's Content-Range)."""
    if plan.status == 416:
        return _json(start_response, 416, {"error": "range not satisfiable"}, method, plan.headers)
    start_response(_status(plan.status), headers)
    return []


def _content_type(name: str) -> str:
    for suffix, content_type in _CONTENT_TYPES.items():
        if name.endswith(suffix):
            return content_type
    return "application/octet-stream"


def _status(code: int) -> str:
    return f"{code} {HTTPStatus(code).phrase}"


def _respond(start_response: StartResponse, code: int, body: dict | bytes, method: str,
             extra: list[tuple[str, str]]) -> Iterable[bytes]:
    """A JSON body, or an HTML page (bytes)."""
    if isinstance(body, dict):
        return _json(start_response, code, body, method, extra)
    start_response(_status(code), [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body))), *extra])
    return [] if method == "HEAD" else [body]


def error_response(start_response: StartResponse, code: int, message: str, method: str) -> Iterable[bytes]:
    return _json(start_response, code, {"error": message}, method)


def _json(
    start_response: StartResponse,
    code: int,
    body: dict,
    method: str,
    extra: list[tuple[str, str]] | None = None,
    exc_info: Any = None,
) -> Iterable[bytes]:
    data = json.dumps(body).encode("utf-8") + b"\n"
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *(extra or [])]
    start_response(_status(code), headers, exc_info)
    # HEAD: the same headers, no body (waitress does not strip it for us).
    return [] if method == "HEAD" else [data]
