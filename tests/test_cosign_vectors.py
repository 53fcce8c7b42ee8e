"""Every cosign test vector behaves as tests/vectors/cosign/README.md says.

The vectors are real keys and bundles from sigstore-conformance, sigstore-go,
sigstore-rs and cosign; they are run through the real `otad-release` CLI.
"""
from __future__ import annotations


import pytest

from conftest import VECTORS, assert_one_line_error, otad_release

HAPPY = VECTORS / "conformance" / "managed-key-happy-path"
BLOB = VECTORS / "conformance" / "a.txt"
GO = VECTORS / "sigstore-go"


def verify(*args: str):
    return otad_release("verify", *args)


def test_happy_path_bundle_verifies_with_its_key():
    result = verify("--key", str(HAPPY / "key.pub"), "--bundle", str(HAPPY / "bundle.sigstore.json"), str(BLOB))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"verified {BLOB}: key key.pub"


def test_no_key_bundle_fails_without_a_trusted_key():
    result = verify("--bundle", str(VECTORS / "conformance" / "managed-key-no-key_fail" / "bundle.sigstore.json"), str(BLOB))
    assert_one_line_error(result, "no trusted key")


def test_sigstore_go_bundle_without_tlog_verifies():
    result = verify(
        "--key", str(GO / "public-key-validity.pem"),
        "--bundle", str(GO / "public-key-validity.sigstore.json"),
        str(GO / "public-key-validity.artifact.txt"),
    )
    assert result.returncode == 0, result.stderr
    assert "key public-key-validity.pem" in result.stdout


def test_legacy_bundle_without_tlog_verifies():
    result = verify("--key", str(HAPPY / "key.pub"), "--bundle", str(VECTORS / "derived" / "legacy-key-no-tlog.bundle"), str(BLOB))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["legacy-key-in-cert-no-tlog.bundle", "legacy-key-in-cert-with-tlog.bundle"])
def test_legacy_bundle_with_key_in_cert_is_rejected(name):
    result = verify("--key", str(HAPPY / "key.pub"), "--bundle", str(VECTORS / "derived" / name), str(BLOB))
    assert_one_line_error(result, "'cert'")


def test_wrong_key_is_reported_as_unknown(tmp_path):
    other = VECTORS / "keys" / "cosign_github_workflows_cosign-test.pub"
    result = verify("--key", str(other), "--bundle", str(HAPPY / "bundle.sigstore.json"), str(BLOB))
    assert_one_line_error(result, "unknown key")


def test_rotation_any_trusted_key_verifies():
    other = VECTORS / "keys" / "cosign_github_workflows_cosign-test.pub"
    result = verify("--key", str(other), "--key", str(HAPPY / "key.pub"), "--bundle", str(HAPPY / "bundle.sigstore.json"), str(BLOB))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("key key.pub")


def test_flipped_blob_byte_fails_on_digest(tmp_path):
    blob = tmp_path / "a.txt"
    data = bytearray(BLOB.read_bytes())
    data[0] ^= 0x01
    blob.write_bytes(bytes(data))
    result = verify("--key", str(HAPPY / "key.pub"), "--bundle", str(HAPPY / "bundle.sigstore.json"), str(blob))
    assert_one_line_error(result, "messageDigest does not match")


def test_flipped_blob_byte_fails_legacy_signature(tmp_path):
    blob = tmp_path / "a.txt"
    data = bytearray(BLOB.read_bytes())
    data[-1] ^= 0x01
    blob.write_bytes(bytes(data))
    result = verify("--key", str(HAPPY / "key.pub"), "--bundle", str(VECTORS / "derived" / "legacy-key-no-tlog.bundle"), str(blob))
    assert_one_line_error(result, "signature does not verify")


KEYS = VECTORS / "keys"
PASSWORDS = {
    "sigstore-rs_cosign_generated_encrypted_empty_private.key": "",
    "sigstore-rs_ecdsa_encrypted_private.key": "123",
    "cosign_keys_test_pemsigstorekey.key": "hello",
    "cosign_keys_test_pemcosignkey.key": "hello",
}


@pytest.mark.parametrize("name", sorted(PASSWORDS))
def test_vector_key_decrypts_and_signs(tmp_path, name):
    blob = tmp_path / "blob"
    blob.write_bytes(b"signed by a vector key\n")
    bundle = tmp_path / "blob.bundle"
    signed = otad_release("sign", "--key", str(KEYS / name), "--bundle", str(bundle), str(blob), env={"COSIGN_PASSWORD": PASSWORDS[name]})
    assert signed.returncode == 0, signed.stderr
    # The public half is derived independently with the cryptography package.
    from cryptography.hazmat.primitives import serialization
    from otad.trust.keys import load_private_key

    key = load_private_key((KEYS / name).read_bytes(), PASSWORDS[name].encode())
    pub = tmp_path / "vector.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    result = verify("--key", str(pub), "--bundle", str(bundle), str(blob))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", sorted(PASSWORDS) + ["cosign_github_workflows_cosign-test.key"])
def test_vector_key_with_wrong_password_is_a_clear_error(tmp_path, name):
    blob = tmp_path / "blob"
    blob.write_bytes(b"x")
    result = otad_release("sign", "--key", str(KEYS / name), "--bundle", str(tmp_path / "b"), str(blob), env={"COSIGN_PASSWORD": "not-the-password"})
    assert_one_line_error(result, "wrong password")
    assert not (tmp_path / "b").exists()


def test_happy_path_bundle_with_flipped_signature_fails(tmp_path):
    import json

    doc = json.loads((HAPPY / "bundle.sigstore.json").read_text())
    sig = doc["messageSignature"]["signature"]
    doc["messageSignature"]["signature"] = sig[:20] + ("A" if sig[20] != "A" else "B") + sig[21:]
    bundle = tmp_path / "bundle.json"
    bundle.write_text(json.dumps(doc))
    result = verify("--key", str(HAPPY / "key.pub"), "--bundle", str(bundle), str(BLOB))
    assert_one_line_error(result, "signature does not verify")
