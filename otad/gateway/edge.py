"""The gateway's edge listener: what robots on edge_net talk to.

GET/HEAD /manifest (alias /ota/manifest.json), /manifest.bundle (alias
/ota/manifest.json.bundle), GET /rollout.json, GET/HEAD /ota/<file>, GET /healthz,
POST /metrics, POST /lease (Wire 5: install leases, otad/gateway/orchestrator.py). With ROLLOUT_KEYS set, /manifest and its bundle are per robot (Wire 2,
docs/formats.md): the bearer token names the robot, and it gets the release its
rollout assigns it now; without a token only if MANIFEST_ALLOW_ANONYMOUS.
Only files of cached, verified releases are ever served: names are looked up
in the cache snapshot, never joined onto a path from the request.
"""
from __future__ import annotations

import hashlib
import logging
import ssl
import time
from urllib.parse import urlsplit

from otad import __version__
from otad.gateway.buffer import TelemetryBuffer
from otad.errors import OtadError
from otad.gateway.cache import Cache, CachedRelease
from otad.gateway.leasefiles import OrchestrationFileError
from otad.gateway.leasewire import MAX_BODY_BYTES as MAX_LEASE_BYTES, LeaseRequestError, parse_lease_request
from otad.gateway.orchestrator import Orchestrator
from otad.gateway.rollouts import Rollouts
from otad.telemetry.records import MAX_BODY_BYTES, RecordError, parse_batch
from otad.telemetry.tokens import TokenTable, bearer
from otad.transfer.files import safe_file_name
from otad.transfer.http import Validators, content_etag
from otad.transfer.server import Handler, Server, ServerLimits
from otad.trust import clock

log = logging.getLogger("otad.gateway")
MANIFEST_PATHS = ("/manifest", "/ota/manifest.json")
BUNDLE_PATHS = ("/manifest.bundle", "/ota/manifest.json.bundle")
CONTENT_TYPES = {".gz": "application/gzip", ".json": "application/json", ".bundle": "application/json"}


def content_type(name: str) -> str:
    for suffix, kind in CONTENT_TYPES.items():
        if name.endswith(suffix):
            return kind
    return "text/plain; charset=utf-8" if name.endswith((".sha256", ".asc")) else "application/octet-stream"


class Ingest:
    """What the robot routes need: the buffer, the robots' tokens (swapped on SIGHUP), the
    rollouts (None or disabled: newest release to all) and MANIFEST_ALLOW_ANONYMOUS."""

    def __init__(self, buffer: TelemetryBuffer, tokens: TokenTable | None, rollouts: Rollouts | None = None,
                 anonymous: bool = True, orchestrator: Orchestrator | None = None) -> None:
        self.buffer = buffer
        self.tokens = tokens
        self.rollouts = rollouts
        self.anonymous = anonymous
        self.orchestrator = orchestrator

    def identify(self, header: str | None) -> str | None:
        """The robot a bearer token names (None: no token file, no token, or a wrong one); a robot
        heard from is up, for the orchestrator's min_available."""
        robot = self.tokens.identify(bearer(header) or "") if self.tokens else None
        if robot is not None and self.orchestrator is not None:
            self.orchestrator.heard_from(robot, clock.now())
        return robot

    @property
    def rolling(self) -> Rollouts | None:
        return self.rollouts if self.rollouts is not None and self.rollouts.enabled else None


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
                path = urlsplit(self.path).path
                if path == "/lease":
                    self._lease()
                    return
                if path != "/metrics":
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

        def _authenticated_body(self, limit: int) -> tuple[str, bytes] | None:
            """(robot, body) of a POST with a robot's token and a Content-Length of at most `limit`;
            None after the 401/411/413 was sent."""
            robot = ingest.identify(self.headers.get("Authorization"))
            length = self.headers.get("Content-Length")
            if robot is None:
                self.close_connection = True  # do not read an unauthenticated body
                self.send_error_json(401, "missing or wrong bearer token", [("WWW-Authenticate", "Bearer")])
                return None
            if length is None or not length.isdigit():
                self.close_connection = True
                self.send_error_json(411, "Content-Length required")
                return None
            if int(length) > limit:
                self.close_connection = True
                self.send_error_json(413, f"body is larger than {limit} bytes")
                return None
            return robot, self.read_body(int(length))

        def _lease(self) -> None:
            """Wire 5: the answer is sent only once the lease table it reflects is on disk."""
            got = self._authenticated_body(MAX_LEASE_BYTES)
            if got is None:
                return
            robot, body = got
            try:
                request = parse_lease_request(body)
            except LeaseRequestError as exc:
                self.send_error_json(400, str(exc))
                return
            if ingest.orchestrator is None:
                self.send_error_json(503, "site orchestration is not running", [("Retry-After", "5")])
                return
            try:
                answer = ingest.orchestrator.handle(robot, request, clock.now())
            except OrchestrationFileError:  # logged by the orchestrator; the robot asks again
                self.send_error_json(503, "lease table could not be saved, retry later", [("Retry-After", "5")])
                return
            self.send_json(200, answer, [("Cache-Control", "no-store")])

        def _ingest(self) -> None:
            got = self._authenticated_body(MAX_BODY_BYTES)
            if got is None:
                return
            robot, body = got
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
            if ingest.rolling is not None:
                try:
                    ingest.rolling.observe(records, clock.now())
                except OtadError as exc:  # the robot sends them again; the buffer drops the duplicates
                    log.error("rollout: cannot record the events of %s: %s", robot, exc)
                    self.send_error_json(503, "rollout state unavailable, retry later", [("Retry-After", "5")])
                    return
            self.send_json(200, {"accepted": accepted, "duplicates": duplicates, "refused": refused})

        def _robot(self) -> tuple[bool, str | None]:
            """(may go on, the robot the bearer token names). Without rollouts: today's anonymous routes."""
            if ingest.rolling is None:
                return True, None
            token = bearer(self.headers.get("Authorization"))
            if token is None and ingest.anonymous:
                return True, None
            robot = ingest.identify(self.headers.get("Authorization")) if token else None
            if robot is None:
                self.send_error_json(401, "missing or wrong bearer token (robots authenticate with their telemetry token)",
                                     [("WWW-Authenticate", "Bearer")])
                return False, None
            return True, robot

        def _release(self, snapshot, robot: str | None) -> CachedRelease | None:
            """The release this robot is given now (Wire 2); None after a 404 was sent."""
            if robot is not None:
                served = ingest.rolling.serve(robot, set(snapshot.releases), clock.now())
                release = snapshot.releases.get(served.version) if served.version else None
                if release is not None:
                    return release
                if served.hold:
                    self.send_error_json(404, f"no release for robot {robot} now: {served.reason}")
                    return None
            if snapshot.active is None:
                self.send_error_json(404, "no verified release cached yet")
            return snapshot.active

        def _send_signed(self, data: bytes) -> None:
            # Per robot: the validators are the bytes' own (another robot may get another release).
            validators = Validators(len(data), content_etag(hashlib.sha256(data).hexdigest()), int(time.time()))
            self.send_bytes(data, validators, "application/json")

        def _route(self) -> None:
            path = urlsplit(self.path).path
            snapshot = cache.snapshot
            if path in MANIFEST_PATHS or path in BUNDLE_PATHS or path == "/rollout.json":
                allowed, robot = self._robot()
                if not allowed:
                    return
                if path == "/rollout.json":
                    plans = ingest.rolling.plans_for(robot) if ingest.rolling is not None else []
                    self.send_json(200, {"plans": plans}, [("Cache-Control", "no-store")])
                    return
                if robot is None:  # today's route: the newest verified release
                    self._send_active(snapshot, path in BUNDLE_PATHS)
                    return
                release = self._release(snapshot, robot)
                if release is not None:
                    # The bundle is the signature of the manifest above, from the same release.
                    self._send_signed(release.manifest_bundle if path in BUNDLE_PATHS else release.manifest_bytes)
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

        def _send_active(self, snapshot, bundle: bool) -> None:
            validators = snapshot.bundle_validators if bundle else snapshot.manifest_validators
            if snapshot.active is None or validators is None:
                self.send_error_json(404, "no verified release cached yet")
                return
            self.send_bytes(snapshot.active.manifest_bundle if bundle else snapshot.active.manifest_bytes,
                            validators, "application/json")

    return Server(address, EdgeHandler, ssl_context, limits)
