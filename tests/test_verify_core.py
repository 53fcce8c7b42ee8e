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
from otad.trust.metadata import ExpiredManifest, UnsignedManifest, verify_manifest
from otad.trust.rollback import decide_install, next_floor
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



# -- the manifest itself: verify_manifest (signature, names, expiry) -------------------------


def manifest_pair(out):
    return (out / "manifest.json").read_bytes(), (out / "manifest.json.bundle").read_bytes()


def test_manifest_verifies_and_names_its_key(built):
    out, manifest, anchors = built
    signed = verify_manifest(*manifest_pair(out), anchors, now=manifest.expires_epoch - 1)
    assert signed.manifest == manifest and signed.key == "release.pub" and signed.expired_for == 0


@pytest.mark.parametrize("past,grace,accepted", [(1, 0, False), (0, 0, True), (3600, 7200, True), (7201, 7200, False)])
def test_manifest_expiry_and_grace_at_explicit_times(built, past, grace, accepted):
    out, manifest, anchors = built
    now = manifest.expires_epoch + past
    if accepted:
        assert verify_manifest(*manifest_pair(out), anchors, now=now, grace=grace).expired_for == past
    else:
        with pytest.raises(ExpiredManifest, match=f"manifest expired at {manifest.expires}"):
            verify_manifest(*manifest_pair(out), anchors, now=now, grace=grace)


def test_manifest_changed_by_one_byte_or_unsigned_is_refused(built):
    out, manifest, anchors = built
    data, bundle = manifest_pair(out)
    with pytest.raises(ChecksumMismatch, match="manifest signature: bundle messageDigest"):
        verify_manifest(data.replace(b'"size"', b'"size" '), bundle, anchors, now=None)
    with pytest.raises(UnsignedManifest):
        verify_manifest(data, b"", anchors, now=None)
    with pytest.raises(MalformedMetadata):
        verify_manifest(data, (out / manifest.bundle).read_bytes()[:20], anchors, now=None)


def test_manifest_bundle_of_the_artifact_is_not_a_manifest_signature(built):
    """Mix-and-match: the artifact's (valid) bundle presented as the manifest's."""
    out, manifest, anchors = built
    with pytest.raises(ChecksumMismatch):
        verify_manifest((out / "manifest.json").read_bytes(), (out / manifest.bundle).read_bytes(), anchors, now=None)


# -- anti-rollback: decide_install -----------------------------------------------------------
@pytest.mark.parametrize("candidate,current,highest,signed,robot,install,reason", [
    ("1.0.0", None, None, False, True, True, "first release"),
    ("1.1.0", "1.0.0", "1.0.0", False, True, True, "newer"),
    ("1.0.0", "1.0.0", "1.0.0", False, True, False, "is CURRENT"),
    ("0.9.0", "1.0.0", "1.0.0", False, True, False, "lower than CURRENT 1.0.0"),
    ("1.5.0", "1.0.0", "2.0.0", False, True, False, "lower than the highest committed version 2.0.0"),
    ("2.0.0", "1.0.0", "2.0.0", False, True, True, "newer"),  # back up to the floor itself
    ("1.0.0-rc.1", "1.0.0", None, False, True, False, "lower than CURRENT"),
    ("0.9.0", "1.0.0", "1.0.0", True, True, True, "downgrade authorised"),
    ("0.9.0", "1.0.0", "1.0.0", True, False, False, "ALLOW_DOWNGRADE=no"),
    ("3.0.0", "2.0.0", "2.0.0", False, True, True, "newer"),
])
def test_decide_install(candidate, current, highest, signed, robot, install, reason):
    decision = decide_install(candidate, current, highest, [], signed, robot)
    assert decision.install is install and reason in decision.reason


def test_blacklisted_is_quiet_and_floor_moves_only_up_unless_authorised():
    assert decide_install("2.0.0", "1.0.0", None, ["2.0.0"]).quiet
    assert next_floor("2.0.0", "1.5.0", downgrade=False) == "2.0.0"
    assert next_floor("2.0.0", "2.1.0", downgrade=False) == "2.1.0"
    assert next_floor("2.0.0", "1.5.0", downgrade=True) == "1.5.0"
    assert next_floor(None, "1.0.0", downgrade=False) == "1.0.0"


def test_a_downgrade_manifest_created_before_the_newest_accepted_one_is_a_replay():
    """Issue 13 (14): the gateway's bound on replayed allow_downgrade manifests (pure)."""
    old = decide_install("1.5.1", None, "1.6.0", (), True, highest_is="the highest version this gateway verified",
                         created=1000.0, newest_created=2000.0)
    assert not old.install and "a replay" in old.reason and old.reason.startswith(
        "1.5.1 is lower than the highest version this gateway verified 1.6.0")
    fresh = decide_install("1.5.1", None, "1.6.0", (), True, created=2000.0, newest_created=2000.0)
    assert fresh.install and fresh.downgrade
    assert decide_install("1.7.0", None, "1.6.0", (), False, created=1.0, newest_created=2000.0).install  # upgrades: no bound
