"""The release corpus through the real daemons: hostile manifests, bundles and checksum
files (tests/corpus/release-cases.json) to a real gateway and a real robot at once,
and the 37 hostile archives (tests/hostile_archives.py) to a real robot.

The sender is a stand-in: `HostileServer` plays a compromised dashboard (for the
gateway) and a compromised gateway (for the robot) at the same time. It has to
be a stand-in: the real dashboard refuses to serve a malformed manifest, and the
real gateway serves only what it verified. Everything hostile here is signed
with the trusted release key where a signature can be made (manifests, their
bundles, archives), so it is the parser or the consistency check that must
refuse it, not a missing signature. The daemons' own keys, configs, HTTP
clients, caches and installers are the real ones.

Each case must produce its expected reason in the daemon's log, leave nothing
cached or installed, and leave the daemon serving; a good release afterwards
must still go through.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import otad_release
from fleet import Site, rss_high_water_kib, served_manifest, wait_for_version
from harness import Daemon
from hostile_archives import CASES as ARCHIVE_CASES, LIMIT_FILES, long_dir, member_bomb, prepare_outside
from invariants import current_version
from otad.trust.bundle import render_bundle
from otad.trust.keys import load_private_key, public_key_hint
from otad.trust.signing import sign_digest

CORPUS = Path(__file__).parent / "corpus"
RELEASE_CASES = json.loads((CORPUS / "release-cases.json").read_text())
CASE_TIMEOUT = 30


class HostileServer:
    """Serves whatever `files` holds ("/manifest", "/manifest.bundle", "/ota/<name>"), exactly."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Authorization header) of every GET
        self.posts: list[str] = []  # the path of every POST
        self.post_answer: tuple[int, bytes] | None = None  # (status, body) for every POST; None: 404
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                server.requests.append((path, self.headers.get("Authorization")))
                path = {"/ota/manifest.json": "/manifest", "/ota/manifest.json.bundle": "/manifest.bundle"}.get(path, path)
                body = server.files.get(path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()[:32]}"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)

            do_HEAD = do_GET

            def do_POST(self) -> None:
                # By default a gateway from before install leases: POST /lease (or anything else) is not found.
                server.posts.append(self.path)
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, body = server.post_answer or (404, b"")
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Quiet(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:
                pass  # a daemon hanging up mid-answer is no news

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def serve_release(self, out: Path, **replace: bytes) -> None:
        files = {"/manifest": (out / "manifest.json").read_bytes(), "/manifest.bundle": (out / "manifest.json.bundle").read_bytes()}
        manifest = json.loads(files["/manifest"])
        for field in ("artifact", "bundle", "checksum"):
            files[f"/ota/{manifest[field]}"] = (out / manifest[field]).read_bytes()
        files.update(replace)
        self.files = files

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Signer:
    """The release key, in process: a signature per hostile case costs no CLI run."""

    def __init__(self, key_file: Path, password: bytes = b"test-password") -> None:
        self.key = load_private_key(key_file.read_bytes(), password, key_file.name)

    def bundle(self, data: bytes) -> bytes:
        digest = hashlib.sha256(data).digest()
        return render_bundle(sign_digest(self.key, digest), digest, public_key_hint(self.key.public_key()))

    def manifest(self, doc: dict) -> tuple[bytes, bytes]:
        data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
        return data, self.bundle(data)


def log_since(daemon: Daemon, offset: int) -> str:
    return daemon.log()[offset:]


def wait_for_reason(daemon: Daemon, offset: int, fragment: str, timeout: float = CASE_TIMEOUT) -> str | None:
    """The first new log line holding `fragment`, or None after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log_since(daemon, offset).splitlines():
            if fragment in line:
                return line
        if not daemon.running():
            return None
        time.sleep(0.05)
    return None


@pytest.fixture
def hostile(tmp_path, keypair):
    key, pub = keypair
    site = Site(tmp_path, key, pub)
    server = HostileServer()
    site.hostile, site.signer = server, Signer(key)
    yield site
    site.stop_all()
    server.close()


def cached_files(site: Site, name: str = "gw") -> set[str]:
    folder = site.root / f"{name}-state" / "cache" / "files"
    return set(os.listdir(folder)) if folder.exists() else set()


def generated_cases(site: Site, good: Path, other_key: Signer) -> list[dict]:
    """Cases that need a signature made now: over the hostile bytes, by the wrong key, or expired."""
    doc = json.loads((good / "manifest.json").read_text())
    data, _ = site.signer.manifest({**doc, "x-corpus-case": "other-key"})
    unsigned, _ = site.signer.manifest({**doc, "x-corpus-case": "unsigned"})
    expired, expired_bundle = site.signer.manifest({**doc, "x-corpus-case": "expired", "expires": "2020-01-01T00:00:00Z"})
    relabelled, _ = site.signer.manifest({**doc, "x-corpus-case": "bundle-of-other-bytes"})
    artifact = (good / doc["artifact"]).read_bytes()
    return [
        {"kind": "manifest-signature", "id": "signed-by-untrusted-key", "files": {"/manifest": data, "/manifest.bundle": other_key.bundle(data)},
         "expect": "manifest signature", "why": "a key the operator never trusted"},
        {"kind": "manifest-signature", "id": "empty-manifest-bundle", "files": {"/manifest": unsigned, "/manifest.bundle": b""},
         "expect": "not signed", "why": "an unsigned manifest"},
        {"kind": "manifest-signature", "id": "bundle-of-other-bytes",
         "files": {"/manifest": relabelled, "/manifest.bundle": site.signer.bundle(relabelled + b" ")},
         "expect": "manifest signature", "why": "a valid signature over different bytes"},
        {"kind": "manifest-signature", "id": "expired", "files": {"/manifest": expired, "/manifest.bundle": expired_bundle},
         "expect": "expired", "why": "freeze attack: an old, correctly signed manifest replayed"},
        {"kind": "bundle", "id": "artifact-signed-by-untrusted-key", "files": {f"/ota/{doc['bundle']}": other_key.bundle(artifact)},
         "expect": "signed by an unknown key", "why": "right artifact, wrong key"},
    ]


@pytest.mark.slow
def test_release_corpus_is_refused_by_a_real_gateway_and_a_real_robot(hostile, tmp_path):
    site = hostile
    first, target = site.build("1.0.0"), site.build("3.0.0")
    server = site.hostile
    server.serve_release(first)
    gw = site.gateway(dashboard_url=server.url).start()
    robot = site.robot(server.url).start(wait_listening=False)
    gw.wait_for_log(r"verified app 1\.0\.0", timeout=CASE_TIMEOUT)
    robot.wait_for_log(r"installed app 1\.0\.0", timeout=CASE_TIMEOUT)
    good_files = cached_files(site)

    other_prefix = tmp_path / "other"
    assert otad_release("keygen", "--output-prefix", str(other_prefix)).returncode == 0
    cases = [*RELEASE_CASES, *generated_cases(site, target, Signer(other_prefix.with_suffix(".key")))]
    target_doc = json.loads((target / "manifest.json").read_text())
    failures = []
    for case in cases:
        if case["kind"] == "manifest":
            data = (CORPUS / case["file"]).read_bytes()
            server.serve_release(first, **{"/manifest": data, "/manifest.bundle": site.signer.bundle(data)})
        else:
            # A fresh, validly signed 3.0.0 manifest per case (an extra field makes its bytes new, so no
            # daemon takes it for the one it already refused), with one release file swapped.
            data, bundle = site.signer.manifest({**target_doc, "x-corpus-case": case["id"]})
            swapped = case.get("files") or {
                f"/ota/{target_doc[case['kind']]}": (CORPUS / case["file"]).read_bytes()}
            server.serve_release(target, **{"/manifest": data, "/manifest.bundle": bundle, **swapped})
        offsets = {name: len(d.log()) for name, d in (("gateway", gw), ("robot", robot))}
        for name, daemon in (("gateway", gw), ("robot", robot)):
            line = wait_for_reason(daemon, offsets[name], case["expect"])
            if line is None:
                failures.append(f"{case['kind']}/{case['id']}: {name} never logged {case['expect']!r}; "
                                f"it logged: {log_since(daemon, offsets[name])[-600:]!r}")
        assert gw.running() and robot.running(), failures

    assert failures == [], "\n".join(failures)
    assert len(cases) >= 60
    assert cached_files(site) == good_files  # nothing hostile cached
    assert served_manifest(gw.url)["version"] == "1.0.0"
    assert current_version(tmp_path / "robot-app") == "1.0.0"
    assert sorted(os.listdir(tmp_path / "robot-app" / "releases")) == ["1.0.0", "1.0.0.ok"]
    for daemon in (gw, robot):
        assert "Traceback" not in daemon.log()
    # Not wedged: the genuine 3.0.0 goes through both.
    server.serve_release(target)
    wait_for_version(gw.url, "3.0.0", timeout=CASE_TIMEOUT)
    robot.wait_for_log(r"installed app 3\.0\.0", timeout=CASE_TIMEOUT)


# Where the robot may refuse an archive before unpacking it (its VERSION header check), the
# reason comes from that check instead of the unpacker's.
ARCHIVE_ALTERNATIVES = {
    "version-missing": ("does not start with its VERSION file",),
    "version-symlink": ("does not start with its VERSION file",),
    "not-gzip": ("not a gzip stream",),
    "truncated": ("archive ends inside", "not a gzip stream"),
}
ROBOT_MAX_MB = 32


def archive_reasons(case_id: str, reason: str | None) -> tuple[str, ...]:
    if reason is None:
        return ()
    reason = reason.replace("exceeds 64 MiB", f"exceeds {ROBOT_MAX_MB} MiB")
    return (reason, *ARCHIVE_ALTERNATIVES.get(case_id, ()))


def serve_signed_archive(site: Site, archive: bytes, version: str) -> None:
    """Serve `archive` as app `version`: signed with the trusted key, with its checksum file and a signed manifest."""
    name = f"app-v{version}.tar.gz"
    sha = hashlib.sha256(archive).hexdigest()
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 86400))
    doc = {"schema": 1, "name": "app", "version": version, "artifact": name, "bundle": f"{name}.bundle",
           "checksum": f"app-v{version}.sha256", "size": len(archive), "sha256": sha, "signature": "cosign",
           "created": "2026-11-26T00:00:00Z", "expires": expires}
    data, bundle = site.signer.manifest(doc)
    site.hostile.files = {"/manifest": data, "/manifest.bundle": bundle, f"/ota/{name}": archive,
                          f"/ota/{name}.bundle": site.signer.bundle(archive),
                          f"/ota/app-v{version}.sha256": f"{sha}  {name}\n".encode()}


@pytest.mark.slow
def test_every_hostile_archive_is_refused_by_a_real_robot(hostile, tmp_path):
    """All 37 archives, each signed with the trusted key and served with a signed manifest."""
    site = hostile
    outside = tmp_path / "outside"
    prepare_outside(outside)
    server = site.hostile
    server.serve_release(site.build("1.0.0"))
    robot = site.robot(server.url, MAX_UNPACKED_MB=ROBOT_MAX_MB, MAX_FILES=LIMIT_FILES).start(wait_listening=False)
    robot.wait_for_log(r"installed app 1\.0\.0", timeout=CASE_TIMEOUT)
    failures, installed = [], ["1.0.0"]
    for n, (case_id, builder, reason) in enumerate(ARCHIVE_CASES, start=1):
        version = f"1.0.{n}"
        archive = builder(tmp_path / "archives", version, outside).read_bytes()
        serve_signed_archive(site, archive, version)
        offset = len(robot.log())
        if reason is None:
            if wait_for_reason(robot, offset, f"installed app {version}") is None:
                failures.append(f"{case_id}: not installed: {log_since(robot, offset)[-400:]!r}")
            installed.append(version)
            continue
        line = None
        deadline = time.monotonic() + CASE_TIMEOUT
        while line is None and time.monotonic() < deadline and robot.running():
            line = next((l for l in log_since(robot, offset).splitlines()
                         if f"rejected app {version}" in l and any(r in l for r in archive_reasons(case_id, reason))), None)
            time.sleep(0.05)
        if line is None:
            failures.append(f"{case_id}: expected one of {archive_reasons(case_id, reason)}; got {log_since(robot, offset)[-500:]!r}")
        if os.path.lexists(tmp_path / "robot-app" / "releases" / version):
            failures.append(f"{case_id}: releases/{version} left behind")
    assert failures == [], "\n".join(failures)
    assert robot.running() and "Traceback" not in robot.log()
    assert current_version(tmp_path / "robot-app") == installed[-1]
    assert sorted(os.listdir(outside)) == ["passwd"] and (outside / "passwd").read_bytes().startswith(b"root:")


PEAK_RSS_BOUND_KIB = 64 * 1024  # docs/security.md: the unpacker's memory does not grow with the member count
BOMB_FILES = 25_000


@pytest.mark.slow
def test_a_member_bomb_at_the_file_limit_installs_in_bounded_memory(hostile, tmp_path):
    """The worst legal archive at the robot's MAX_FILES: one 16 KiB global PAX header (127
    records), then symlinks with 1 KiB names, 25 KiB of parser state per member if any is kept.

    The real robot must install it and its peak RSS (VmHWM, the whole daemon's) stay under
    64 MiB. MAX_FILES is 25,000 here, not the shipped 100,000, to keep the test short:
    test_robot_unpack.py shows the unpacker's peak does not depend on the count. The
    daemon's address space is capped at 1 GiB first, so a regression fails this test
    instead of taking the test machine's memory.
    """
    site = hostile
    archive = member_bomb(tmp_path / "archives", "2.0.0", tmp_path, members=BOMB_FILES - 2).read_bytes()
    site.hostile.serve_release(site.build("1.0.0"))
    robot = site.robot(site.hostile.url, MAX_FILES=BOMB_FILES).start(wait_listening=False)
    robot.wait_for_log(r"installed app 1\.0\.0", timeout=CASE_TIMEOUT)
    _, hard = resource.prlimit(robot.proc.pid, resource.RLIMIT_AS)
    resource.prlimit(robot.proc.pid, resource.RLIMIT_AS, (1 << 30, hard))

    serve_signed_archive(site, archive, "2.0.0")
    robot.wait_for_log(r"(installed|rejected) app 2\.0\.0.*", timeout=300)
    assert current_version(tmp_path / "robot-app") == "2.0.0", robot.log()[-800:]
    assert len(os.listdir(tmp_path / "robot-app" / "CURRENT" / long_dir())) == BOMB_FILES - 2
    peak = rss_high_water_kib(robot.proc.pid)
    assert peak < PEAK_RSS_BOUND_KIB, f"robot peak RSS {peak // 1024} MiB while unpacking {BOMB_FILES} members"
    assert robot.running() and "Traceback" not in robot.log()
