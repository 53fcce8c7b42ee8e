"""The one place where an artifact is accepted: size, sha256, then signature.

`verify_artifact` is what the gateway, the robot and `otad-release verify`
call. It streams the file once to hash it, then makes pure decisions on the
digest, the manifest entry and the signature bytes. The first failed check
raises its own `TrustError` subclass, so callers can log and count the reason.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from otad.errors import BadSignature, ChecksumMismatch, MalformedMetadata, UntrustedKey
from otad.trust.bundle import parse_bundle
from otad.trust.digest import FileDigest, digest_file
from otad.trust.keys import PublicKey
from otad.trust.manifest import Manifest, parse_checksum_file
from otad.trust.signing import signature_matches


@dataclass(frozen=True)
class TrustAnchors:
    """What the operator trusts: cosign public keys and, optionally, a GnuPG keyring."""

    cosign_keys: tuple[PublicKey, ...] = ()
    gpg_keyring: bytes | None = None  # exported public keys (binary or armored)


@dataclass(frozen=True)
class VerifiedArtifact:
    name: str
    version: str
    size: int
    sha256: str
    key: str  # which trusted key verified the signature


def verify_cosign_signature(sha256: bytes, bundle_bytes: bytes, keys: tuple[PublicKey, ...] | list[PublicKey]) -> PublicKey:
    """Return the trusted key whose signature over `sha256` the bundle holds."""
    bundle = parse_bundle(bundle_bytes)
    if bundle.digest is not None and bundle.digest != sha256:
        raise ChecksumMismatch("bundle messageDigest does not match the artifact's sha256")
    if not keys:
        raise UntrustedKey("no trusted key was given; a bundle never supplies its own key")
    # Try the key the hint names first; with rotation several keys may be trusted.
    ordered = sorted(keys, key=lambda k: k.hint != bundle.hint)
    for key in ordered:
        if signature_matches(key.key, bundle.signature, sha256):
            return key
    if bundle.hint is not None and all(k.hint != bundle.hint for k in keys):
        raise UntrustedKey(f"signed by an unknown key (hint {bundle.hint}); trusted: {_names(keys)}")
    raise BadSignature(f"signature does not verify with any trusted key ({_names(keys)})")


def check_digest(observed: FileDigest, manifest: Manifest) -> None:
    """Compare what was received with what the manifest promises."""
    if observed.size != manifest.size:
        raise ChecksumMismatch(f"size is {observed.size} bytes, manifest says {manifest.size}")
    if observed.hex != manifest.sha256:
        raise ChecksumMismatch(f"sha256 is {observed.hex}, manifest says {manifest.sha256}")


def check_checksum_file(checksum_bytes: bytes, manifest: Manifest) -> None:
    """The `.sha256` file must name the same artifact and digest as the manifest."""
    digest_hex, file_name = parse_checksum_file(checksum_bytes)
    if file_name != manifest.artifact:
        raise MalformedMetadata(f"checksum file names {file_name!r}, manifest names {manifest.artifact!r}")
    if digest_hex != manifest.sha256:
        raise ChecksumMismatch("checksum file's sha256 differs from the manifest's")


def verify_artifact(
    path: str | os.PathLike[str],
    manifest: Manifest,
    signature_bytes: bytes,
    anchors: TrustAnchors,
    checksum_bytes: bytes | None = None,
    observed: FileDigest | None = None,
) -> VerifiedArtifact:
    """Verify a downloaded artifact; pass `observed` when it was hashed while downloading."""
    if checksum_bytes is not None:
        check_checksum_file(checksum_bytes, manifest)
    if observed is None:
        observed = digest_file(path)
    check_digest(observed, manifest)
    if manifest.signature == "gpg":
        if anchors.gpg_keyring is None:
            raise UntrustedKey("release is signed with gpg but no gpg keyring is trusted")
        from otad.trust import gpg  # python-gnupg is loaded only where gpg releases are used

        key_name = gpg.verify_detached(anchors.gpg_keyring, signature_bytes, path)
    else:
        key_name = verify_cosign_signature(observed.sha256, signature_bytes, anchors.cosign_keys).name
    return VerifiedArtifact(
        name=manifest.name, version=manifest.version, size=observed.size, sha256=observed.hex, key=key_name
    )


def _names(keys) -> str:
    return ", ".join(k.name for k in keys) or "none"
