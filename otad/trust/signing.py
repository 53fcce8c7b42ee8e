"""ECDSA P-256 / SHA-256 signatures over a precomputed digest.

Signing and verifying the digest (not the bytes) lets callers hash a file of
any size once, while streaming it, and still produce the exact signature that
cosign makes over the raw bytes: ECDSA signs the SHA-256 of the message anyway.
"""
from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

_PREHASHED_SHA256 = ec.ECDSA(utils.Prehashed(hashes.SHA256()))


def sign_digest(key: ec.EllipticCurvePrivateKey, sha256: bytes) -> bytes:
    return key.sign(sha256, _PREHASHED_SHA256)


def signature_matches(key: ec.EllipticCurvePublicKey, signature: bytes, sha256: bytes) -> bool:
    try:
        key.verify(signature, sha256, _PREHASHED_SHA256)
    except (InvalidSignature, ValueError):
        return False
    return True
