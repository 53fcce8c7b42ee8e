"""The shared verification core raises one typed error per failure class.

Gateway and robot branch on these classes (a TrustError is never retried with the
same bytes), so the classes themselves are behaviour, checked here on real files,
real keys and real signatures.
"""
from __future__ import annotations

import base64
import json

import pytest

from conftest import make_app, otad_release
from otad.errors import BadSignature, ChecksumMismatch, MalformedMetadata, UntrustedKey
from otad.trust.digest import digest_file
from otad.trust.keys import load_public_key_files
from otad.trust.manifest import parse_manifest
from otad.trust.verify import TrustAnchors, verify_artifact


@pytest.fixture
def built(tmp_path, keypair):
    key, pub = keypair
    app = make_app(tmp_path / "app", "3.1.4")
    out = tmp_path / "out"
    assert otad_release("build", "--app-dir", str(app), "--version", "3.1.4", "--key", str(key), "--out", str(out)).returncode == 0
    manifest = parse_manifest((out / "manifest.json").read_bytes())
    anchors = TrustAnchors(cosign_keys=tuple(load_public_key_files([str(pub)])))
    return out, manifest, anchors


def run(out, manifest, anchors, **overrides):
    bundle = overrides.pop("bundle", (out / manifest.bundle).read_bytes())
    checksum = overrides.pop("checksum", (out / manifest.checksum).read_bytes())
    return verify_artifact(out / manifest.artifact, manifest, bundle, anchors, checksum_bytes=checksum, **overrides)


def test_returns_the_verified_facts(built):
    out, manifest, anchors = built
    facts = run(out, manifest, anchors)
    assert (facts.name, facts.version, facts.size, facts.sha256, facts.key) == (
        "app", "3.1.4", manifest.size, manifest.sha256, "release.pub",
    )


def test_digest_observed_while_downloading_is_used_as_is(built):
    out, manifest, anchors = built
    observed = digest_file(out / manifest.artifact)
    (out / manifest.artifact).write_bytes(b"")  # not re-read when the digest is supplied
    assert run(out, manifest, anchors, observed=observed).sha256 == manifest.sha256


def test_size_mismatch(built):
    out, manifest, anchors = built
    with open(out / manifest.artifact, "ab") as stream:
        stream.write(b"\0")
    with pytest.raises(ChecksumMismatch, match="size"):
        run(out, manifest, anchors)


def test_bad_signature(built):
    out, manifest, anchors = built
    doc = json.loads((out / manifest.bundle).read_text())
    other = json.loads((out / manifest.bundle).read_text())
    sig = bytearray(base64.b64decode(doc["messageSignature"]["signature"]))
    sig[-1] ^= 1
    other["messageSignature"]["signature"] = base64.b64encode(bytes(sig)).decode()
    with pytest.raises(BadSignature):
        run(out, manifest, anchors, bundle=json.dumps(other).encode())


def test_untrusted_key(built, tmp_path):
    out, manifest, _ = built
    prefix = tmp_path / "stranger"
    assert otad_release("keygen", "--output-prefix", str(prefix)).returncode == 0
    anchors = TrustAnchors(cosign_keys=tuple(load_public_key_files([f"{prefix}.pub"])))
    with pytest.raises(UntrustedKey):
        run(out, manifest, anchors)


@pytest.mark.parametrize("bundle", [b"", b"{}", b"[1]", b'{"mediaType": "x"}', b'{"base64Signature": 5}', b"x" * 300_000])
def test_malformed_bundle(built, bundle):
    out, manifest, anchors = built
    with pytest.raises(MalformedMetadata):
        run(out, manifest, anchors, bundle=bundle)


def test_checksum_file_for_another_artifact(built):
    out, manifest, anchors = built
    with pytest.raises(MalformedMetadata, match="checksum file names"):
        run(out, manifest, anchors, checksum=f"{manifest.sha256}  other.tar.gz\n".encode())

