"""The gateway's edge listener: what robots on edge_net talk to.

GET/HEAD /manifest (alias /ota/manifest.json), /manifest.bundle (alias
/ota/manifest.json.bundle), GET/HEAD /ota/<file>, GET /healthz.
Only files of cached, verified releases are ever served: names are looked up
in the cache snapshot, never joined onto a path from the request.
"""
from __future__ import annotations

import logging
import ssl
from urllib.parse import urlsplit

from otad import __version__
from otad.gateway.buffer import TelemetryBuffer
from otad.gateway.cache import Cache
from otad.telemetry.records import MAX_BODY_BYTES, RecordError, parse_batch
from otad.telemetry.tokens import TokenTable, bearer
from otad.transfer.files import safe_file_name
from otad.transfer.server import Handler, Server, ServerLimits

log = logging.getLogger("otad.gateway")
CONTENT_TYPES = {".gz": "application/gzip", ".json": "application/json", ".bundle": "application/json"}


def content_type(name: str) -> str:
    for suffix, kind in CONTENT_TYPES.items():
        if name.endswith(suffix):
            return kind
    return "text/plain; charset=utf-8" if name.endswith((".sha256", ".asc")) else "application/octet-stream"


class Ingest:
    """What POST /metrics needs: the buffer and the robots' tokens (swapped on SIGHUP)."""

    def __init__(self, buffer: TelemetryBuffer, tokens: TokenTable | None) -> None:
        self.buffer = buffer
        self.tokens = tokens


def make_edge_server(address: tuple[str, int], cache: Cache, ingest: Ingest,
                     ssl_context: ssl.SSLContext | None = None, limits: ServerLimits | None = None) -> Server:
    class EdgeHandler(Handler):
        # TCP_NODELAY. A response goes out in two writes (headers, then body). With Nagle on, the
        # small body waits for the client's ACK of the headers, which a keep-alive client delays
        # by up to 40 ms: every POST /metrics took >= 40 ms and 100 robots got ~2,000/s.
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            try:
                self._route()
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                self.close_connection = True
            except Exception as exc:  # a bug must cost one request, not the listener
                log.error("edge: %s %s failed: %s: %s", self.command, self.path[:200], type(exc).__name__, exc)
                self.close_connection = True

        do_HEAD = do_GET

        def do_POST(self) -> None:
            try:
                if urlsplit(self.path).path != "/metrics":
                    self.send_error_json(405, "method not allowed", [("Allow", "GET, HEAD")])
                    return
                self._ingest()
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                self.close_connection = True
            except Exception as exc:
                log.error("edge: POST %s failed: %s: %s", self.path[:200], type(exc).__name__, exc)
                self.close_connection = True

        def do_PUT(self) -> None:
            self.send_error_json(405, "method not allowed", [("Allow", "GET, HEAD, POST")])

        do_DELETE = do_PATCH = do_PUT

        def _ingest(self) -> None:
            robot = ingest.tokens.identify(bearer(self.headers.get("Authorization")) or "") if ingest.tokens else None
            length = self.headers.get("Content-Length")
            if robot is None:
                self.close_connection = True  # do not read an unauthenticated body
                self.send_error_json(401, "missing or wrong bearer token", [("WWW-Authenticate", "Bearer")])
                return
            if length is None or not length.isdigit():
                self.close_connection = True
                self.send_error_json(411, "Content-Length required")
                return
            if int(length) > MAX_BODY_BYTES:
                self.close_connection = True
                self.send_error_json(413, f"body is larger than {MAX_BODY_BYTES} bytes")
                return
            body = self.read_body(int(length))
            try:
                records = parse_batch(body)
            except RecordError as exc:
                self.send_error_json(exc.status, str(exc))
                return
            foreign = next((r["robot_id"] for r in records if r["robot_id"] != robot), None)
            if foreign is not None:
                self.send_error_json(403, f"token is for robot {robot}, record is for {foreign}")
                return
            try:
                accepted, duplicates, refused = ingest.buffer.append(records)
            except Exception as exc:
                log.error("telemetry: cannot store records from %s: %s", robot, exc)
                self.send_error_json(503, "telemetry store unavailable, retry later", [("Retry-After", "5")])
                return
            self.send_json(200, {"accepted": accepted, "duplicates": duplicates, "refused": refused})

        def _route(self) -> None:
            path = urlsplit(self.path).path
            snapshot = cache.snapshot
            if path in ("/manifest", "/ota/manifest.json"):
                if snapshot.active is None or snapshot.manifest_validators is None:
                    self.send_error_json(404, "no verified release cached yet")
                    return
                self.send_bytes(snapshot.active.manifest_bytes, snapshot.manifest_validators, "application/json")
            elif path in ("/manifest.bundle", "/ota/manifest.json.bundle"):
                # The signature of the manifest above, from the same snapshot's release.
                if snapshot.active is None or snapshot.bundle_validators is None:
                    self.send_error_json(404, "no verified release cached yet")
                    return
                self.send_bytes(snapshot.active.manifest_bundle, snapshot.bundle_validators, "application/json")
            elif path.startswith("/ota/"):
                name = safe_file_name(path[len("/ota/"):])
                served = snapshot.files.get(name) if name else None
                if served is None:
                    self.send_error_json(404, "not found")
                    return
                self.send_file(served.path, served.validators, content_type(name))
            elif path == "/healthz":
                active = snapshot.active.manifest.version if snapshot.active else None
                self.send_json(200, {"status": "ok", "version": __version__, "release": active})
            else:
                self.send_error_json(404, "not found")

    return Server(address, EdgeHandler, ssl_context, limits)
