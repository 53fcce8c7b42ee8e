"""Fuzzing every parser of untrusted input with hypothesis.

Property, for each parser: it returns a valid object or raises its documented
error type (MalformedMetadata and the other TrustErrors, RecordError,
ConfigError, UnsafeArchive, None for "ignore"), never anything else, and in
bounded time. Where a parser returns something, the value is checked too
(round trips, ranges inside the file, names that stay inside a folder).

In `make check` each parser gets a short, deterministic run (derandomize, no
example database: it cannot flake). `make fuzz` sets FUZZ_SECONDS: each parser
is then fuzzed with fresh random seeds for that long, examples saved in
.hypothesis/. Whatever a fuzz run finds becomes a file in tests/corpus/fuzz/,
which test_fuzz_findings_stay_fixed replays on every run.
"""
from __future__ import annotations

import base64
import gzip
import importlib
import itertools
import json
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from otad.config import ConfigError, load_settings
from otad.dashboard.ingest import IngestError, decode_body, parse_forwarded
from otad.dashboard.settings import DashboardSettings
from otad.errors import MalformedMetadata, TrustError
from otad.robot.unpack import UnsafeArchive, _member_name
from otad.trust.links import symlink_target_problem
from otad.semver import Version
from otad.telemetry.records import RecordError, parse_batch, validate_record
from otad.telemetry.tokens import TokenTable, bearer
from otad.transfer.files import _SAFE_NAME, safe_file_name
from otad.transfer.http import Validators, parse_range, plan_response
from otad.trust.bundle import parse_bundle
from otad.trust.manifest import parse_checksum_file, parse_manifest, render_manifest
from otad.rollout.cohort import assignment, phase_of
from otad.rollout.plan import MAX_PLAN_BYTES, parse_plan, render_plan
from otad.rollout.progress import Counts, Evidence, evaluate
from rollouts import plan_doc

FUZZ_SECONDS = float(os.environ.get("FUZZ_SECONDS", "0") or 0)
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
CORPUS = Path(__file__).parent / "corpus" / "fuzz"
REPO = Path(__file__).resolve().parents[1]


def run_fuzz(strategy: st.SearchStrategy, check) -> None:
    """`check(value)` over generated values: short and deterministic, or FUZZ_SECONDS of random seeds."""
    if not FUZZ_SECONDS:
        settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=timedelta(seconds=5),
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(given(strategy)(check))()
        return
    database = DirectoryBasedExampleDatabase(str(REPO / ".hypothesis" / "otad-fuzz"))
    deadline = time.monotonic() + FUZZ_SECONDS
    while time.monotonic() < deadline:  # a fresh random seed each round
        settings(max_examples=500, derandomize=False, database=database, deadline=timedelta(seconds=5),
                 suppress_health_check=list(HealthCheck))(given(strategy)(check))()


# -- generators: raw bytes, arbitrary JSON, and valid documents with parts replaced --------
json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                           max_leaves=12)
huge_ints = st.integers(min_value=10**300, max_value=10**320) | st.integers(min_value=-(10**320), max_value=-(10**300))
nasty = st.sampled_from([b"[" * 60000, b'{"a":' * 30000, b"\xff\xfe", b"1e999999", b"-0", b'"\\ud800"', b"NaN", b"Infinity",
                         b'{"schema": 1, "schema": 2}', b"\x00", b" " * 1000])


def mutated(valid: dict) -> st.SearchStrategy:
    """The valid document with some fields replaced by any JSON value, some removed, some added."""
    keys = sorted(valid)
    return st.builds(
        lambda changes, removed, added: {**{k: v for k, v in valid.items() if k not in removed}, **changes, **added},
        st.dictionaries(st.sampled_from(keys), json_values | huge_ints | st.text(max_size=300), max_size=3),
        st.sets(st.sampled_from(keys), max_size=2),
        st.dictionaries(st.text(max_size=10), json_values, max_size=2),
    )


def documents(valid: dict) -> st.SearchStrategy[bytes]:
    as_json = (mutated(valid) | json_values).map(lambda doc: json.dumps(doc).encode())
    return as_json | st.binary(max_size=2000) | nasty


VALID_MANIFEST = {
    "schema": 1, "name": "app", "version": "1.2.3", "artifact": "app-v1.2.3.tar.gz", "bundle": "app-v1.2.3.tar.gz.bundle",
    "checksum": "app-v1.2.3.sha256", "size": 141, "sha256": "d3" * 32, "signature": "cosign",
    "created": "2026-11-26T20:32:20Z", "expires": "2026-12-26T20:32:20Z",
}
VALID_BUNDLE = {
    "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
    "verificationMaterial": {"publicKey": {"hint": "aGludA=="}, "tlogEntries": []},
    "messageSignature": {"messageDigest": {"algorithm": "SHA2_256", "digest": base64.b64encode(bytes(32)).decode()},
                         "signature": base64.b64encode(b"0" * 70).decode()},
}
VALID_RECORD = {"robot_id": "r1", "boot_id": "b-1", "seq": 1, "ts": "2026-11-26T10:00:00Z", "type": "metric",
                "cpu": 1.5, "mem": 2.0, "version": "1.0.0", "health": "ok"}


# -- release metadata ----------------------------------------------------------------------
def check_manifest(data: bytes) -> None:
    try:
        manifest = parse_manifest(data)
    except TrustError:
        return
    assert parse_manifest(render_manifest(manifest)) == manifest  # what it accepted, it can write back
    Version(manifest.version)
    assert manifest.size >= 0 and len(set(manifest.files)) == 3
    assert all(_SAFE_NAME.fullmatch(name) and ".." not in name for name in manifest.files)


def test_fuzz_manifest():
    run_fuzz(documents(VALID_MANIFEST), check_manifest)


def check_plan_document(data: bytes) -> None:
    """A rollout plan (otad/rollout/plan.py; no daemon reads plans yet): accepted plans round-trip through
    their canonical bytes, and the pure decisions on them answer for any robot without raising."""
    try:
        plan = parse_plan(data)
    except TrustError:
        return
    canonical = render_plan(plan)
    assert parse_plan(canonical) == plan and len(canonical) <= MAX_PLAN_BYTES * 2
    percents = [p.percent for p in plan.phases]
    assert percents == sorted(percents) and 0 <= plan.offline_max_phase < len(plan.phases)
    for robot in ("a1", "robot-7"):
        phase = phase_of(plan, robot)
        got = assignment(plan, robot, "1.0.0", len(plan.phases))
        assert got.version in (None, plan.version) and (got.version is None or got.phase == phase)
    evidence = Evidence(fleet={0: Counts(committed=1, failed=1)}, sites={"s": {0: Counts(failed=2)}})
    progress = evaluate(plan, {0: 0.0}, evidence, 1e9, site="s", online=False)
    assert progress.opened == 1 and not (progress.advance and progress.halt)


def _plan_variants() -> st.SearchStrategy[dict]:
    valid = plan_doc()
    phase = st.fixed_dictionaries({}, optional={"robots": st.lists(st.sampled_from(["a1", "b1", "c", "../x", ""]), max_size=3),
                                                "percent": st.integers(-5, 105) | st.floats(allow_nan=False),
                                                "min_soak_s": st.integers(-1, 10**6), "advance": st.sampled_from(["auto", "approve", "x"]),
                                                "halt": st.dictionaries(st.sampled_from(["fleet", "site", "zone"]), mutated({"max_failures": 0, "max_failure_rate": 0.5, "min_attempts": 2}), max_size=2)})
    with_phases = st.builds(lambda doc, phases: {**doc, "phases": phases}, mutated(valid), st.lists(phase, min_size=0, max_size=4))
    return mutated(valid) | with_phases


# Version texts, with numeric identifiers often spelled with leading zeros.
_identifiers = st.sampled_from(["0", "00", "01", "1", "001", "10", "a", "0a", "rc", "beta", "x1"]) | st.from_regex(r"[0-9A-Za-z]{1,4}", fullmatch=True)
version_texts = st.builds(
    lambda core, pre: ".".join(map(str, core)) + ("-" + ".".join(pre) if pre else ""),
    st.tuples(*[st.integers(0, 12)] * 3), st.lists(_identifiers, max_size=3),
)


def check_versions(pair: tuple[str, str]) -> None:
    """Two accepted spellings are the same version only if they are the same text (issue 13,
    item 15: 1.0.0-01 == 1.0.0-1, while blacklists compare text), and the order is total."""
    parsed = []
    for text in pair:
        try:
            parsed.append(Version(text))
        except TrustError:
            return
    a, b = parsed
    assert (a == b) == (pair[0] == pair[1]), pair
    assert (a < b) + (a == b) + (b < a) == 1, pair


def test_fuzz_versions():
    run_fuzz(st.tuples(version_texts, version_texts) | version_texts.map(lambda t: (t, t.replace("-1", "-01"))), check_versions)


def check_version_pair(data: bytes) -> None:
    check_versions(tuple(data.decode().split()))


def check_bundle(data: bytes) -> None:
    try:
        bundle = parse_bundle(data)
    except TrustError:
        return
    assert isinstance(bundle.signature, bytes) and 0 < len(bundle.signature) <= 512
    assert bundle.digest is None or len(bundle.digest) == 32


def test_fuzz_rollout_plan():
    canonical = _plan_variants().map(lambda doc: json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
    run_fuzz(canonical | documents(plan_doc()), check_plan_document)


def test_fuzz_bundle():
    run_fuzz(documents(VALID_BUNDLE), check_bundle)


def check_checksum(data: bytes) -> None:
    try:
        digest, name = parse_checksum_file(data)
    except MalformedMetadata:
        return
    assert len(digest) == 64 and set(digest) <= set("0123456789abcdef") and name and " " not in name


def test_fuzz_checksum_file():
    lines = st.builds(lambda h, sep, name, nl: f"{h}{sep}{name}{nl}".encode(), st.text("0123456789abcdefABCDEF", min_size=60, max_size=66),
                      st.sampled_from(["  ", " *", " ", "\t", "   "]), st.text(max_size=40), st.sampled_from(["", "\n", "\r\n", "\n\n"]))
    run_fuzz(lines | st.binary(max_size=5000), check_checksum)


# -- telemetry bodies --------------------------------------------------------------------------
def check_batch(body: bytes) -> None:
    try:
        records = parse_batch(body)
    except RecordError as exc:
        assert exc.status in (400, 413)
        return
    for record in records:
        assert validate_record(record) == record  # clean records stay clean


def test_fuzz_record_json():
    batch = st.lists(mutated(VALID_RECORD), min_size=1, max_size=3).map(lambda rs: json.dumps({"records": rs}).encode())
    run_fuzz(batch | documents(VALID_RECORD), check_batch)


def check_forwarded(case: tuple[bytes, bool]) -> None:
    body, compressed = case
    try:
        data = decode_body(gzip.compress(body) if compressed else body, "gzip" if compressed else None)
        buffer_id, backlog, rows = parse_forwarded(data, "gw")
    except IngestError as exc:
        assert 400 <= exc.status < 500
        return
    assert backlog >= 0 and rows and all(row["id"] > 0 for row in rows)


def test_fuzz_forwarded_batch():
    valid = {"gateway_id": "gw", "buffer_id": "ab12", "backlog": 3, "records": [{"id": 1, "received": 1.0, "record": VALID_RECORD}]}
    run_fuzz(st.tuples(documents(valid), st.booleans()), check_forwarded)


def check_gzip(body: bytes) -> None:
    try:
        decode_body(body, "gzip")
    except IngestError as exc:
        assert exc.status in (400, 413)


def test_fuzz_gzip_body():
    run_fuzz(st.binary(max_size=3000) | st.binary(max_size=500).map(lambda b: gzip.compress(b)[: len(b) // 2 + 10]), check_gzip)


# -- config files ---------------------------------------------------------------------------------
_CONFIG_DIR = Path(tempfile.mkdtemp(prefix="otad-fuzz-config-"))


def check_config(text: bytes) -> None:
    path = _CONFIG_DIR / "dashboard.conf"
    path.write_bytes(text)
    try:
        settings_ = load_settings(DashboardSettings, path, required=True, environ={})
    except ConfigError:
        return
    assert 0 <= settings_.listen[1] <= 65535 and 1 <= settings_.threads <= 256


def test_fuzz_config():
    keys = st.sampled_from(["LISTEN", "OTA_DIR", "STATE_DIR", "THREADS", "DB_PATH", "TOKENS_FILE", "HEADER_TIMEOUT",
                            "CONNECTION_LIMIT", "lower", "X-Y", ""])
    values = st.text(max_size=40) | st.sampled_from(["127.0.0.1:0", "[::1]:8080", "[::1", "99999", "٣", "²", "'quoted'", '"', "0"])
    line = st.builds(lambda k, sep, v: f"{k}{sep}{v}", keys, st.sampled_from(["=", " = ", "==", ":", ""]), values)
    files = st.lists(line | st.text(max_size=30), max_size=6).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass"))
    run_fuzz(files | st.binary(max_size=300), check_config)


# -- HTTP: Range and conditional headers ------------------------------------------------------------
def check_range(case: tuple[str, int]) -> None:
    header, size = case
    span = parse_range(header, size)
    if span is None or span == "unsatisfiable":
        return
    start, length = span
    assert 0 <= start and length >= 1 and start + length <= size


def test_fuzz_range_header():
    specs = st.builds(lambda a, b, sep: f"bytes={a}{sep}{b}", st.text("0123456789 -", max_size=30),
                      st.text("0123456789 ", max_size=30), st.sampled_from(["-", ",", "--", "", "-,"]))
    run_fuzz(st.tuples(specs | st.text(max_size=60), st.integers(0, 2**40)), check_range)


class _Headers(dict):
    def get(self, name, default=None):  # case-insensitive like http.server's and our WSGI view
        for key, value in self.items():
            if key.lower() == name.lower():
                return value
        return default


def check_plan(case) -> None:
    method, headers, size = case
    plan = plan_response(method, _Headers(headers), Validators(size, '"abc"', 1_700_000_000))
    assert plan.status in (200, 206, 304, 416)
    if plan.status == 206:
        assert method == "GET" and plan.length >= 1 and plan.start + plan.length <= size
        first, last_total = dict(plan.headers)["Content-Range"].removeprefix("bytes ").split("-")
        assert int(first) == plan.start and last_total == f"{plan.start + plan.length - 1}/{size}"
    if plan.status == 200:
        assert plan.start == 0 and plan.length == size


def test_fuzz_conditional_requests():
    names = st.sampled_from(["Range", "If-Range", "If-None-Match", "If-Modified-Since", "range", "X-Other"])
    values = st.text(max_size=80) | st.sampled_from(['"abc"', 'W/"abc"', "*", "bytes=0-", "bytes=-5", "bytes=5-1",
                                                     "Tue, 14 Nov 2023 22:13:20 GMT", "Mon, 99 Foo 1 1:1:1 GMT"])
    run_fuzz(st.tuples(st.sampled_from(["GET", "HEAD"]), st.dictionaries(names, values, max_size=4), st.integers(0, 10**6)),
             check_plan)


# -- names: tar members, link targets, URL tails, tokens --------------------------------------------
path_text = st.text(st.sampled_from(list("ab./\\\0%~ é")) | st.characters(), max_size=40)


def check_member_name(raw: str) -> None:
    try:
        name = _member_name(raw)
    except UnsafeArchive:
        return
    parts = name.split("/")
    assert name and not name.startswith("/") and ".." not in parts and "\0" not in name and "." not in parts[1:]


def test_fuzz_tar_member_names():
    run_fuzz(path_text, check_member_name)


def check_link_target(case: tuple[str, str]) -> None:
    name, target = case
    try:
        member = _member_name(name)
    except UnsafeArchive:
        return
    if symlink_target_problem(member, target) is not None:
        return
    import posixpath

    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(member), target))
    assert not target.startswith("/") and resolved != ".." and not resolved.startswith("../")
    parts = [part for part in target.split("/") if part not in ("", ".")]
    assert ".." not in list(itertools.dropwhile(lambda part: part == "..", parts))


def test_fuzz_tar_link_targets():
    run_fuzz(st.tuples(path_text, path_text), check_link_target)


def check_url_tail(tail: str) -> None:
    name = safe_file_name(tail)
    if name is not None:
        assert _SAFE_NAME.fullmatch(name) and ".." not in name and "/" not in name and "\\" not in name


def test_fuzz_url_file_names():
    run_fuzz(path_text | st.text(st.sampled_from(list("%2eEfF5c/.a0")), max_size=20), check_url_tail)


def check_tokens(case: tuple[str | None, str]) -> None:
    header, presented = case
    table = TokenTable([("r1", "token-0123456789abcdef"), ("r2", "another-0123456789abc")])
    token = bearer(header)
    assert token is None or (token and token == token.strip())
    assert table.identify(presented) in (None, "r1", "r2")


def test_fuzz_bearer_tokens():
    run_fuzz(st.tuples(st.none() | st.text(max_size=60).map(lambda t: "Bearer " + t) | st.text(max_size=60),
                       st.text(max_size=60) | st.sampled_from(["token-0123456789abcdef", ""])), check_tokens)


# -- findings stay fixed ---------------------------------------------------------------------------
def check_range_file(data: bytes) -> None:
    header, size = data.decode().split("\n")[:2]  # the Range header, then the file size
    check_range((header, int(size)))
    check_plan(("GET", {"Range": header}, int(size)))


PARSERS = {"manifest": check_manifest, "plan": check_plan_document, "bundle": check_bundle, "checksum": check_checksum, "records": check_batch,
           "gzip": check_gzip, "config": check_config, "range": check_range_file, "versions": check_version_pair}


def _orchestration(name: str):
    """A check of test_fuzz_orchestration.py, looked up when a finding is replayed (that module
    imports this one's generators, so it cannot be imported here at load time)."""
    return lambda data: getattr(importlib.import_module("test_fuzz_orchestration"), name)(data)


PARSERS.update(window=_orchestration("check_window_file"), leases=_orchestration("check_lease_table"),
               leasereq=_orchestration("check_lease_request"))


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*")), ids=lambda p: p.name)
def test_fuzz_findings_stay_fixed(path: Path):
    """tests/corpus/fuzz/<parser>-<what>: inputs that once broke a parser's property."""
    PARSERS[path.name.split("-", 1)[0]](path.read_bytes())
