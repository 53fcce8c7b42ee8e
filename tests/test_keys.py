"""`otad-release keygen`: cosign's key formats, loaded back, and clear errors on bad key files."""
from __future__ import annotations

import base64
import json
import stat

from conftest import assert_one_line_error, otad_release


def test_keygen_writes_cosign_formats(keypair):
    key, pub = keypair
    text = key.read_text()
    assert text.startswith("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n")
    body = base64.b64decode("".join(text.strip().splitlines()[1:-1]))
    doc = json.loads(body)
    assert doc["kdf"]["name"] == "scrypt"
    assert doc["kdf"]["params"] == {"N": 65536, "r": 8, "p": 1}
    assert len(base64.b64decode(doc["kdf"]["salt"])) == 32
    assert doc["cipher"]["name"] == "nacl/secretbox"
    assert len(base64.b64decode(doc["cipher"]["nonce"])) == 24
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----\n")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_keygen_keys_sign_and_verify(keypair, tmp_path):
    key, pub = keypair
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 100)
    bundle = tmp_path / "blob.bundle"
    assert otad_release("sign", "--key", str(key), "--bundle", str(bundle), str(blob)).returncode == 0
    doc = json.loads(bundle.read_text())
    assert doc["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert doc["messageSignature"]["messageDigest"]["algorithm"] == "SHA2_256"
    assert "hint" in doc["verificationMaterial"]["publicKey"]
    ok = otad_release("verify", "--key", str(pub), "--bundle", str(bundle), str(blob))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"verified {blob}: key release.pub"


def test_legacy_sign_writes_base64signature_only(keypair, tmp_path):
    key, pub = keypair
    blob = tmp_path / "blob"
    blob.write_bytes(b"legacy\n")
    bundle = tmp_path / "blob.sig.json"
    assert otad_release("sign", "--legacy", "--key", str(key), "--bundle", str(bundle), str(blob)).returncode == 0
    assert set(json.loads(bundle.read_text())) == {"base64Signature"}
    assert otad_release("verify", "--key", str(pub), "--bundle", str(bundle), str(blob)).returncode == 0


def test_empty_password_is_allowed(tmp_path):
    prefix = tmp_path / "empty"
    assert otad_release("keygen", "--output-prefix", str(prefix), env={"COSIGN_PASSWORD": ""}).returncode == 0
    blob = tmp_path / "blob"
    blob.write_bytes(b"x")
    signed = otad_release("sign", "--key", f"{prefix}.key", "--bundle", str(tmp_path / "b"), str(blob), env={"COSIGN_PASSWORD": ""})
    assert signed.returncode == 0, signed.stderr


def test_keygen_never_overwrites_without_force(keypair):
    key, pub = keypair
    before = key.read_bytes(), pub.read_bytes()
    prefix = str(key.with_suffix(""))
    assert_one_line_error(otad_release("keygen", "--output-prefix", prefix), "refusing to overwrite")
    assert (key.read_bytes(), pub.read_bytes()) == before
    assert otad_release("keygen", "--output-prefix", prefix, "--force").returncode == 0
    assert (key.read_bytes(), pub.read_bytes()) != before


def test_wrong_password_is_one_line(keypair, tmp_path):
    key, _ = keypair
    blob = tmp_path / "blob"
    blob.write_bytes(b"x")
    result = otad_release("sign", "--key", str(key), "--bundle", str(tmp_path / "b"), str(blob), env={"COSIGN_PASSWORD": "wrong"})
    assert_one_line_error(result, "wrong password")


def test_missing_password_without_terminal_is_one_line(keypair, tmp_path):
    key, _ = keypair
    blob = tmp_path / "blob"
    blob.write_bytes(b"x")
    import os, subprocess, sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "COSIGN_PASSWORD"}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "otad-release"), "sign", "--key", str(key), "--bundle", str(tmp_path / "b"), str(blob)],
        capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60,
    )
    assert_one_line_error(result, "COSIGN_PASSWORD")


def test_truncated_private_key_is_one_line(keypair, tmp_path):
    key, _ = keypair
    truncated = tmp_path / "truncated.key"
    truncated.write_bytes(key.read_bytes()[:200])
    blob = tmp_path / "blob"
    blob.write_bytes(b"x")
    result = otad_release("sign", "--key", str(truncated), "--bundle", str(tmp_path / "b"), str(blob))
    assert_one_line_error(result, "truncated")


def test_truncated_public_key_is_one_line(keypair, tmp_path):
    _, pub = keypair
    truncated = tmp_path / "truncated.pub"
    truncated.write_bytes(pub.read_bytes()[:60])
    blob = tmp_path / "blob"
    blob.write_bytes(b"x")
    result = otad_release("verify", "--key", str(truncated), "--bundle", str(tmp_path / "b"), str(blob))
    assert_one_line_error(result, "truncated")


def test_corrupted_key_body_is_one_line(keypair, tmp_path):
    key, _ = keypair
    lines = key.read_text().splitlines()
    lines[1] = "!!!!" + lines[1][4:]
    bad = tmp_path / "bad.key"
    bad.write_text("\n".join(lines) + "\n")
    blob = tmp_path / "blob"
    blob.write_bytes(b"x")
    result = otad_release("sign", "--key", str(bad), "--bundle", str(tmp_path / "b"), str(blob))
    assert_one_line_error(result, "base64")


def test_plain_pkcs8_private_key_is_accepted(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "plain.key"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    pub = tmp_path / "plain.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    blob = tmp_path / "blob"
    blob.write_bytes(b"plain\n")
    assert otad_release("sign", "--key", str(pem), "--bundle", str(tmp_path / "b"), str(blob)).returncode == 0
    assert otad_release("verify", "--key", str(pub), "--bundle", str(tmp_path / "b"), str(blob)).returncode == 0


def test_sec1_private_key_is_refused_like_cosign(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from otad.trust.pem import encode_pem

    key = ec.generate_private_key(ec.SECP256R1())
    sec1 = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    path = tmp_path / "sec1.key"
    path.write_bytes(encode_pem("PRIVATE KEY", sec1))
    blob = tmp_path / "blob"
    blob.write_bytes(b"x")
    result = otad_release("sign", "--key", str(path), "--bundle", str(tmp_path / "b"), str(blob))
    assert_one_line_error(result, "PKCS#8")


def test_trusted_key_folder(keypair, tmp_path):
    key, pub = keypair
    blob = tmp_path / "blob"
    blob.write_bytes(b"folder\n")
    assert otad_release("sign", "--key", str(key), "--bundle", str(tmp_path / "b"), str(blob)).returncode == 0
    result = otad_release("verify", "--key", str(pub.parent), "--bundle", str(tmp_path / "b"), str(blob))
    assert result.returncode == 0, result.stderr
