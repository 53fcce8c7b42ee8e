"""Signed, expiring manifests: the one place where a manifest itself is accepted.

`verify_manifest` takes the manifest's exact bytes, the bytes of
`manifest.json.bundle` (a signature over those bytes, made by the same signing
code as the artifact's), the operator's trust anchors and the time, and returns
what may be believed, or raises a `TrustError`:

- signature: the bundle must verify over the manifest's sha256 under a trusted
  key (cosign) or keyring (gpg, when the manifest says `"signature": "gpg"`);
- names: artifact, checksum and signature file names must be the ones
  `otad-release build` derives from name and version (mix-and-match);
- expiry: a manifest past `expires` is refused (freeze attack), unless it
  expired less than `grace` seconds ago (the robot's offline tolerance).

Pure: no network, no clock (the caller passes `now`), disk only for gpg's home.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from otad.errors import MalformedMetadata, TrustError
from otad.trust.manifest import Manifest, parse_manifest
from otad.trust.verify import TrustAnchors, verify_cosign_signature

MANIFEST = "manifest.json"
MANIFEST_BUNDLE = "manifest.json.bundle"
SIGNATURE_SUFFIXES = {"cosign": ".bundle", "gpg": ".asc"}


class ExpiredManifest(TrustError):
    """A correctly signed manifest whose `expires` has passed (beyond any grace)."""


class UnsignedManifest(TrustError):
    """No manifest bundle was offered: the manifest cannot be authenticated."""


@dataclass(frozen=True)
class SignedManifest:
    manifest: Manifest
    key: str  # the trusted key (cosign key file name or gpg fingerprint) that signed it
    expired_for: float = 0.0  # seconds past `expires` (> 0 only when accepted within grace)


def verify_manifest(data: bytes, bundle: bytes, anchors: TrustAnchors, now: float | None, grace: float = 0.0) -> SignedManifest:
    """Accept a manifest: parsed, signed by a trusted key, self-consistent, not expired.

    `now=None` skips the expiry check: a gateway re-checking its own cache at
    start-up keeps serving what it verified when it was fresh.
    """
    manifest = parse_manifest(data)
    key = manifest_signer(data, manifest, bundle, anchors)
    check_release_names(manifest)
    expired_for = 0.0 if now is None else now - manifest.expires_epoch
    if expired_for > grace:
        within = f" (more than the {grace:.0f}s grace)" if grace > 0 else ""
        raise ExpiredManifest(f"manifest expired at {manifest.expires}, {describe_age(expired_for)} ago{within}")
    return SignedManifest(manifest, key, max(expired_for, 0.0))


def manifest_signer(data: bytes, manifest: Manifest, bundle: bytes, anchors: TrustAnchors) -> str:
    """The trusted key that signed exactly `data`, or a TrustError."""
    if not bundle:
        raise UnsignedManifest("manifest is not signed: empty manifest bundle")
    if manifest.signature == "gpg":
        if anchors.gpg_keyring is None:
            raise TrustError("manifest is signed with gpg but no gpg keyring is trusted")
        from otad.trust import gpg

        return gpg.verify_detached_bytes(anchors.gpg_keyring, bundle, data)
    try:
        return verify_cosign_signature(hashlib.sha256(data).digest(), bundle, anchors.cosign_keys).name
    except TrustError as exc:
        raise type(exc)(f"manifest signature: {exc}") from None


def check_release_names(manifest: Manifest) -> None:
    """The file names must say the manifest's name and version, as build writes them:
    a signed manifest for 1.3 cannot point at 1.2's (also signed) files."""
    stem = f"{manifest.name}-v{manifest.version}"
    expected = {
        "artifact": f"{stem}.tar.gz",
        "checksum": f"{stem}.sha256",
        "bundle": f"{stem}.tar.gz{SIGNATURE_SUFFIXES[manifest.signature]}",
    }
    for field, name in expected.items():
        if getattr(manifest, field) != name:
            raise MalformedMetadata(f"manifest field '{field}' is {getattr(manifest, field)!r}, expected {name!r} for {manifest.name} {manifest.version}")


def describe_age(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.0f} hours"
    if seconds >= 120:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds:.0f}s"


def bundle_names_manifest(data: bytes, bundle: bytes) -> bool | None:
    """Does this bundle claim to sign exactly `data`? None when it cannot say (legacy
    cosign bundles and gpg signatures carry no digest). Not a trust decision: the
    dashboard and `publish` use it to keep a manifest and its bundle a consistent pair."""
    from otad.trust.bundle import parse_bundle

    if bundle.lstrip().startswith(b"-----BEGIN PGP SIGNATURE-----"):
        return None
    try:
        parsed = parse_bundle(bundle)
    except TrustError:
        return False
    if parsed.digest is None:
        return None
    return parsed.digest == hashlib.sha256(data).digest()
