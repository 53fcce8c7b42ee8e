"""Cosign-compatible key files: encrypted private keys and PEM public keys.

Format (as `cosign generate-key-pair` writes it): a PEM block labelled
`ENCRYPTED SIGSTORE PRIVATE KEY` (older: `ENCRYPTED COSIGN PRIVATE KEY`) whose
body is JSON naming an scrypt KDF and a nacl/secretbox cipher; the plaintext is
a PKCS#8 DER ECDSA P-256 key. Public keys are PEM `PUBLIC KEY` (SPKI).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from otad.errors import KeyFileError
from otad.trust.pem import decode_pem, encode_pem

ENCRYPTED_LABELS = ("ENCRYPTED SIGSTORE PRIVATE KEY", "ENCRYPTED COSIGN PRIVATE KEY")
WRITE_LABEL = "ENCRYPTED SIGSTORE PRIVATE KEY"
# cosign accepts exactly these work factors (and always writes 65536, r=8, p=1).
ACCEPTED_SCRYPT_N = (32768, 65536, 131072)
WRITE_SCRYPT_N = 65536
SCRYPT_R, SCRYPT_P = 8, 1


@dataclass(frozen=True)
class PublicKey:
    """A trusted verification key and the name it is reported under."""

    name: str
    key: ec.EllipticCurvePublicKey
    hint: str  # base64 sha256 of the SPKI DER, as Sigstore bundles name keys


def public_key_hint(key: ec.EllipticCurvePublicKey) -> str:
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode("ascii")


def load_public_key(pem: bytes, name: str) -> PublicKey:
    label, der = decode_pem(pem, name)
    if label != "PUBLIC KEY":
        raise KeyFileError(f"{name}: expected a PEM PUBLIC KEY, found {label}")
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"{name}: PUBLIC KEY block is not a valid key") from None
    _require_p256(key, name)
    return PublicKey(name=name, key=key, hint=public_key_hint(key))


def load_public_key_files(paths: list[str]) -> list[PublicKey]:
    """Read trusted keys; a directory contributes every `*.pub` file inside it."""
    files: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            files.extend(sorted(p for p in path.glob("*.pub") if p.is_file()))
        else:
            files.append(path)
    keys = []
    for path in files:
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"{path}: cannot read key file ({exc.strerror})") from None
        keys.append(load_public_key(pem, path.name))
    return keys


def load_private_key(pem: bytes, password: bytes, name: str = "private key") -> ec.EllipticCurvePrivateKey:
    """Decrypt a cosign key file, or load a plain PKCS#8 PEM `PRIVATE KEY`."""
    label, body = decode_pem(pem, name)
    if label == "PRIVATE KEY":
        der = body
    elif label in ENCRYPTED_LABELS:
        der = _decrypt_cosign_body(body, password, name)
    else:
        raise KeyFileError(f"{name}: unsupported PEM label {label!r}")
    _require_pkcs8(der, name)
    try:
        key = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(f"{name}: private key is not a valid PKCS#8 key") from None
    _require_p256(key, name)
    return key


def _decrypt_cosign_body(body: bytes, password: bytes, name: str) -> bytes:
    try:
        doc = json.loads(body)
        kdf, cipher = doc["kdf"], doc["cipher"]
        params = kdf["params"]
        n, r, p = params["N"], params["r"], params["p"]
        salt = base64.b64decode(kdf["salt"], validate=True)
        nonce = base64.b64decode(cipher["nonce"], validate=True)
        ciphertext = base64.b64decode(doc["ciphertext"], validate=True)
        kdf_name, cipher_name = kdf["name"], cipher["name"]
    except (ValueError, KeyError, TypeError):
        raise KeyFileError(f"{name}: encrypted key body is not cosign's JSON format") from None
    if kdf_name != "scrypt" or cipher_name != "nacl/secretbox":
        raise KeyFileError(f"{name}: unsupported key encryption {kdf_name}/{cipher_name}")
    if n not in ACCEPTED_SCRYPT_N or r != SCRYPT_R or p != SCRYPT_P:
        raise KeyFileError(f"{name}: unsupported scrypt parameters N={n} r={r} p={p}")
    import nacl.exceptions  # only signers decrypt keys; daemons that verify never load PyNaCl
    import nacl.secret

    if len(nonce) != nacl.secret.SecretBox.NONCE_SIZE:
        raise KeyFileError(f"{name}: secretbox nonce must be {nacl.secret.SecretBox.NONCE_SIZE} bytes")
    box = nacl.secret.SecretBox(_scrypt(password, salt, n))
    try:
        return box.decrypt(ciphertext, nonce)
    except nacl.exceptions.CryptoError:
        raise KeyFileError(f"{name}: wrong password (or corrupted key): decryption failed") from None


def _scrypt(password: bytes, salt: bytes, n: int) -> bytes:
    # scrypt needs 128*r*N bytes; hashlib's default cap (32 MiB) is below cosign's N.
    needed = 128 * SCRYPT_R * n * SCRYPT_P
    return hashlib.scrypt(password, salt=salt, n=n, r=SCRYPT_R, p=SCRYPT_P, dklen=32, maxmem=2 * needed)


def _require_pkcs8(der: bytes, name: str) -> None:
    # PKCS#8 PrivateKeyInfo is SEQUENCE { INTEGER version, SEQUENCE algorithm, ... };
    # SEC1 ECPrivateKey has an OCTET STRING where the algorithm SEQUENCE would be.
    # cosign refuses SEC1, so we do too, to keep key files interchangeable.
    try:
        if der[0] != 0x30:
            raise IndexError
        pos = 2 + (der[1] & 0x7F if der[1] & 0x80 else 0)
        if der[pos] != 0x02:
            raise IndexError
        pos += 2 + der[pos + 1]
        if der[pos] != 0x30:
            raise IndexError
    except IndexError:
        raise KeyFileError(f"{name}: decrypted key is not PKCS#8 (cosign requires PKCS#8)") from None


def _require_p256(key: object, name: str) -> None:
    curve = getattr(key, "curve", None)
    if not isinstance(curve, ec.SECP256R1):
        raise KeyFileError(f"{name}: only ECDSA P-256 keys are supported")


def encrypt_private_key(key: ec.EllipticCurvePrivateKey, password: bytes) -> bytes:
    """Encrypt `key` into a PEM file byte-compatible with `cosign generate-key-pair`."""
    import nacl.secret

    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    salt = os.urandom(32)
    box = nacl.secret.SecretBox(_scrypt(password, salt, WRITE_SCRYPT_N))
    nonce = os.urandom(nacl.secret.SecretBox.NONCE_SIZE)
    sealed = box.encrypt(der, nonce)
    doc = {
        "kdf": {
            "name": "scrypt",
            "params": {"N": WRITE_SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P},
            "salt": base64.b64encode(salt).decode("ascii"),
        },
        "cipher": {"name": "nacl/secretbox", "nonce": base64.b64encode(nonce).decode("ascii")},
        "ciphertext": base64.b64encode(sealed.ciphertext).decode("ascii"),
    }
    return encode_pem(WRITE_LABEL, json.dumps(doc, separators=(",", ":")).encode("ascii"))


def public_key_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def generate_key_pair(password: bytes) -> tuple[bytes, bytes]:
    """Return (encrypted private key PEM, public key PEM) for a new P-256 key."""
    key = ec.generate_private_key(ec.SECP256R1())
    return encrypt_private_key(key, password), public_key_pem(key.public_key())
