"""Sigstore bundles for key-based signatures: parse both formats cosign writes, write v0.3.

Only key-based message signatures are accepted. A bundle never supplies the
key: certificates (v0.3 `certificate`/`x509CertificateChain`, legacy `cert`)
are refused outright (GHSA-fx35-mq7g-6g98), and the hint is only used to say
which trusted key was meant. Rekor entries and timestamps are carried but not
needed for offline, key-based verification, so they are ignored.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from otad.errors import MalformedMetadata, UntrustedKey

MEDIA_TYPE_V03 = "application/vnd.dev.sigstore.bundle.v0.3+json"
ACCEPTED_MEDIA_TYPES = (
    "application/vnd.dev.sigstore.bundle+json;version=0.1",
    "application/vnd.dev.sigstore.bundle+json;version=0.2",
    MEDIA_TYPE_V03,
)
# A bundle with a full Rekor inclusion proof is a few KiB; anything far larger is hostile.
MAX_BUNDLE_BYTES = 256 * 1024
MAX_SIGNATURE_BYTES = 512  # a DER P-256 signature is at most 72 bytes


@dataclass(frozen=True)
class Bundle:
    signature: bytes  # ASN.1 DER ECDSA signature over the artifact's sha256
    digest: bytes | None  # sha256 the signer claims, None in the legacy format
    hint: str | None  # base64 sha256 of the signer's SPKI, None in the legacy format
    form: str  # "v0.3" (any Sigstore bundle media type) or "legacy"


def parse_bundle(data: bytes) -> Bundle:
    if len(data) > MAX_BUNDLE_BYTES:
        raise MalformedMetadata(f"bundle is larger than {MAX_BUNDLE_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[... (fuzzing)
        raise MalformedMetadata("bundle is not valid JSON") from None
    if not isinstance(doc, dict):
        raise MalformedMetadata("bundle is not a JSON object")
    if "mediaType" in doc:
        return _parse_sigstore(doc)
    if "base64Signature" in doc:
        return _parse_legacy(doc)
    raise MalformedMetadata("bundle has neither mediaType nor base64Signature")


def _parse_sigstore(doc: dict) -> Bundle:
    if doc["mediaType"] not in ACCEPTED_MEDIA_TYPES:
        raise MalformedMetadata(f"unsupported bundle mediaType {str(doc['mediaType'])[:80]!r}")
    material = doc.get("verificationMaterial")
    if not isinstance(material, dict):
        raise MalformedMetadata("bundle lacks verificationMaterial")
    if "certificate" in material or "x509CertificateChain" in material:
        raise UntrustedKey("bundle carries a certificate; otad trusts only keys given by the operator")
    public_key = material.get("publicKey")
    hint = public_key.get("hint") if isinstance(public_key, dict) else None
    if hint is not None and not isinstance(hint, str):
        raise MalformedMetadata("bundle publicKey.hint is not a string")
    message = doc.get("messageSignature")
    if not isinstance(message, dict):
        what = "a DSSE envelope" if "dsseEnvelope" in doc else "no messageSignature"
        raise MalformedMetadata(f"bundle holds {what}; otad verifies only blob signatures")
    digest_doc = message.get("messageDigest")
    if not isinstance(digest_doc, dict) or digest_doc.get("algorithm") != "SHA2_256":
        raise MalformedMetadata("bundle messageDigest is missing or not SHA2_256")
    digest = _b64_field(digest_doc.get("digest"), "messageDigest.digest", 32)
    if len(digest) != 32:
        raise MalformedMetadata("bundle messageDigest.digest is not 32 bytes")
    signature = _b64_field(message.get("signature"), "messageSignature.signature", MAX_SIGNATURE_BYTES)
    return Bundle(signature=signature, digest=digest, hint=hint, form="v0.3")


def _parse_legacy(doc: dict) -> Bundle:
    if "cert" in doc:
        raise UntrustedKey(
            "bundle carries a key in 'cert'; otad never takes a key from a bundle (GHSA-fx35-mq7g-6g98)"
        )
    signature = _b64_field(doc["base64Signature"], "base64Signature", MAX_SIGNATURE_BYTES)
    return Bundle(signature=signature, digest=None, hint=None, form="legacy")


def _b64_field(value: object, field: str, max_len: int) -> bytes:
    if not isinstance(value, str) or not value:
        raise MalformedMetadata(f"bundle {field} is missing or not a string")
    if len(value) > 2 * max_len:
        raise MalformedMetadata(f"bundle {field} is too long")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedMetadata(f"bundle {field} is not valid base64") from None
    if len(raw) > max_len:
        raise MalformedMetadata(f"bundle {field} is too long")
    return raw


def render_bundle(signature: bytes, digest: bytes, hint: str) -> bytes:
    """A Sigstore v0.3 bundle for a key-based signature with no transparency log entry."""
    doc = {
        "mediaType": MEDIA_TYPE_V03,
        "verificationMaterial": {"publicKey": {"hint": hint}, "tlogEntries": []},
        "messageSignature": {
            "messageDigest": {"algorithm": "SHA2_256", "digest": base64.b64encode(digest).decode("ascii")},
            "signature": base64.b64encode(signature).decode("ascii"),
        },
    }
    return (json.dumps(doc, indent=2) + "\n").encode("ascii")


def render_legacy_bundle(signature: bytes) -> bytes:
    """cosign's older `--new-bundle-format=false` shape, without Rekor data and never a `cert`."""
    return (json.dumps({"base64Signature": base64.b64encode(signature).decode("ascii")}) + "\n").encode("ascii")
