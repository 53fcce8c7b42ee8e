"""manifest.json: the one reader every component uses. Unknown fields ignored; bad ones named."""
from __future__ import annotations

import json

import pytest

from conftest import assert_one_line_error, otad_release
from otad.errors import MalformedMetadata
from otad.semver import Version
from otad.trust.manifest import parse_checksum_file, parse_manifest

GOOD = {
    "schema": 1,
    "name": "app",
    "version": "1.2.3",
    "artifact": "app-v1.2.3.tar.gz",
    "size": 10,
    "sha256": "a" * 64,
    "bundle": "app-v1.2.3.tar.gz.bundle",
    "checksum": "app-v1.2.3.sha256",
    "signature": "cosign",
    "created": "2026-01-02T03:04:05Z",
    "expires": "2026-02-01T03:04:05Z",
}


def encode(doc) -> bytes:
    return json.dumps(doc).encode()


def test_good_manifest_parses_and_ignores_unknown_fields():
    manifest = parse_manifest(encode({**GOOD, "future_field": {"x": 1}}))
    assert manifest.version == "1.2.3" and manifest.size == 10
    assert manifest.allow_downgrade is False  # optional, off unless the signer says so
    assert manifest.expires_epoch == 1769915045.0
    assert parse_manifest(encode({**GOOD, "allow_downgrade": True})).allow_downgrade is True
    assert manifest.files == ("app-v1.2.3.tar.gz", "app-v1.2.3.tar.gz.bundle", "app-v1.2.3.sha256")


@pytest.mark.parametrize("field", sorted(GOOD))
def test_each_missing_field_is_named(field):
    doc = {k: v for k, v in GOOD.items() if k != field}
    with pytest.raises(MalformedMetadata, match=f"'{field}'"):
        parse_manifest(encode(doc))


@pytest.mark.parametrize(
    "field,value,reason",
    [
        ("schema", 2, "schema 2"),
        ("schema", "1", "'schema'"),
        ("size", "10", "'size'"),
        ("size", True, "'size'"),
        ("size", -1, "negative"),
        ("size", 1.5, "'size'"),
        ("sha256", "A" * 64, "'sha256'"),
        ("sha256", "a" * 63, "'sha256'"),
        ("version", "1.2", "MAJOR.MINOR.PATCH"),
        ("artifact", "../etc/passwd", "'artifact'"),
        ("artifact", "/abs.tar.gz", "'artifact'"),
        ("artifact", "a/b.tar.gz", "'artifact'"),
        ("bundle", ".hidden", "'bundle'"),
        ("bundle", "x..y", "'bundle'"),
        ("checksum", "manifest.json", "same file"),
        ("bundle", "app-v1.2.3.tar.gz", "same file"),
        ("signature", "pgp", "'signature'"),
        ("created", "2026-01-02 03:04:05", "'created'"),
        ("created", "2026-13-02T03:04:05Z", "not a valid date"),
        ("name", "", "'name'"),
        ("name", "a" * 65, "'name'"),
        ("expires", "2026-02-01", "'expires'"),
        ("expires", "2026-02-30T00:00:00Z", "not a valid date"),
        ("allow_downgrade", "yes", "'allow_downgrade'"),
        ("allow_downgrade", 1, "'allow_downgrade'"),
    ],
)
def test_bad_values_are_named(field, value, reason):
    with pytest.raises(MalformedMetadata, match=reason):
        parse_manifest(encode({**GOOD, field: value}))


@pytest.mark.parametrize("data", [b"", b"[]", b"null", b"{", b"\xff\xfe", b'{"schema": 1}' + b" " * 70000])
def test_not_a_manifest(data):
    with pytest.raises(MalformedMetadata):
        parse_manifest(data)


def test_cli_reports_a_malformed_manifest_in_one_line(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({**GOOD, "size": "big"}))
    pub = tmp_path / "k"
    assert otad_release("keygen", "--output-prefix", str(pub)).returncode == 0
    assert_one_line_error(otad_release("verify", "--key", f"{pub}.pub", "--manifest", str(path)), "'size'")


@pytest.mark.parametrize(
    "data,ok",
    [
        (b"a" * 64 + b"  app.tar.gz\n", True),
        (b"a" * 64 + b" *app.tar.gz\n", True),
        (b"a" * 64 + b"  app.tar.gz", True),
        (b"a" * 64 + b" app.tar.gz\n", False),
        (b"a" * 63 + b"  app.tar.gz\n", False),
        (b"a" * 64 + b"  app.tar.gz\nextra\n", False),
        (b"", False),
    ],
)
def test_checksum_file_format(data, ok):
    if ok:
        assert parse_checksum_file(data) == ("a" * 64, "app.tar.gz")
    else:
        with pytest.raises(MalformedMetadata):
            parse_checksum_file(data)


def test_version_order_follows_semver():
    ordered = ["0.9.9", "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta.2", "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.0.1", "1.10.0", "2.0.0"]
    versions = [Version(v) for v in ordered]
    assert sorted(reversed(versions)) == versions
    assert Version("1.0.0") == Version("1.0.0") and Version("1.0.0") != Version("1.0.0-rc.1")


@pytest.mark.parametrize("text", ["1.0.0-01", "1.0.0-rc.01", "1.0.0-00", "1.0.0-alpha.007"])
def test_pre_release_numbers_with_leading_zeros_are_refused(text):
    """Issue 13 (15): 1.0.0-01 and 1.0.0-1 compared equal, yet blacklists compare strings,
    so a blacklisted version could come back under another spelling. docs/formats.md says
    no leading zeros: a numeric identifier with one is refused where versions are parsed."""
    with pytest.raises(MalformedMetadata, match="is not MAJOR.MINOR.PATCH"):
        Version(text)


@pytest.mark.parametrize("a,b", [("1.0.0-0", "1.0.0-00a"), ("1.0.0-0a", "1.0.0-a"), ("1.0.0-rc.10", "1.0.0-rc.1")])
def test_versions_that_are_spelled_differently_are_different(a, b):
    assert Version(a) != Version(b) and Version(a) == Version(a)
