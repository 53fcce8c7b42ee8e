"""`otad-release build` and `publish`: seed pipeline steps 2 to 6.

build: package the app reproducibly, checksum it, sign it, write the manifest
and sign the manifest (manifest.json.bundle, same signer as the artifact).
publish: copy a built release into the dashboard's OTA folder so that a
poller never sees a manifest whose files are missing or half written: the
artifacts first (each by rename, durable), then the version's own manifest pair
in OTA_DIR/releases/<version>/ (kept after newer publishes, for gateways whose
rollout plans assign it), then manifest.json with its bundle, each pair as one
durable step (otad.manifest_pair), in OUT as in OTA_DIR.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from pathlib import Path

from otad.errors import OtadError, ReleaseError
from otad.fsutil import atomic_copy, atomic_write_bytes, fsync_dir, make_dirs
from otad.release.archive import write_archive
from otad.release.signers import Signer
from otad.semver import Version
from otad.trust.digest import FileDigest, digest_file
from otad.trust.manifest import (
    Manifest,
    parse_manifest,
    render_checksum_file,
    render_manifest,
    utc_timestamp,
)
from otad.trust.metadata import MANIFEST, MANIFEST_BUNDLE, bundle_names_manifest, check_release_names
from otad.manifest_pair import finish_manifest_pair, pair_names, release_folder, write_manifest_pair
from otad.trust.verify import check_checksum_file, check_digest

DEFAULT_EXPIRES_DAYS = 30.0


def source_date_epoch() -> int:
    raw = os.environ.get("SOURCE_DATE_EPOCH", "0")
    if not raw.isdigit():
        raise ReleaseError(f"SOURCE_DATE_EPOCH={raw!r} is not a whole number of seconds")
    return int(raw)


def build_release(app_dir: str, version: str, name: str, out_dir: str, signer: Signer,
                  expires_in_days: float = DEFAULT_EXPIRES_DAYS, allow_downgrade: bool = False) -> Manifest:
    Version(version)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    artifact = f"{name}-v{version}.tar.gz"
    mtime = source_date_epoch()
    tmp = out / f".{artifact}.building"
    try:
        with open(tmp, "wb") as stream:
            digest = write_archive(app_dir, version, stream, mtime)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, out / artifact)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(out)
    manifest = Manifest(
        name=name,
        version=version,
        artifact=artifact,
        size=digest.size,
        sha256=digest.hex,
        bundle=artifact + signer.suffix,
        checksum=f"{name}-v{version}.sha256",
        signature=signer.kind,
        created=utc_timestamp(mtime if "SOURCE_DATE_EPOCH" in os.environ else time.time()),
        # From the wall clock, never SOURCE_DATE_EPOCH: a reproducible build must not be born expired.
        expires=utc_timestamp(time.time() + expires_in_days * 86400),
        allow_downgrade=allow_downgrade,
    )
    atomic_write_bytes(out / manifest.bundle, signer.sign(out / artifact, digest))
    atomic_write_bytes(out / manifest.checksum, render_checksum_file(digest.hex, artifact))
    data = render_manifest(manifest)
    # Validate what we are about to write with the same reader every consumer uses.
    parse_manifest(data)
    check_release_names(manifest)
    write_signed_manifest(out, data, signer)
    return manifest


def sign_bytes(out: Path, data: bytes, signer: Signer) -> bytes:
    """The signer's bundle over `data` (gpg signs files, so it goes through a temp file)."""
    tmp = out / ".manifest.json.signing"
    try:
        tmp.write_bytes(data)
        return signer.sign(tmp, FileDigest(size=len(data), sha256=hashlib.sha256(data).digest()))
    finally:
        tmp.unlink(missing_ok=True)


def write_signed_manifest(out: Path, data: bytes, signer: Signer) -> None:
    """manifest.json and its bundle, replaced together: never a manifest without its bundle."""
    write_manifest_pair(out, data, sign_bytes(out, data, signer))


def refresh_manifest(out_dir: str, signer: Signer, expires_in_days: float) -> Manifest:
    """A new `expires` for a built (or published) release's manifest, signed again.

    Everything else stays; the artifact is untouched, so publishing the folder
    again sends gateways only the new manifest and its bundle."""
    out = Path(out_dir)
    finish_manifest_pair(out)  # a refresh cut after its commit point: that one is the manifest to refresh
    manifest = dataclasses.replace(read_manifest_file(out / MANIFEST), expires=utc_timestamp(time.time() + expires_in_days * 86400))
    if manifest.signature != signer.kind:
        raise ReleaseError(f"{out / MANIFEST} is signed with {manifest.signature}; refresh it with a {manifest.signature} key")
    write_signed_manifest(out, render_manifest(manifest), signer)
    return manifest


def read_manifest_file(path: str | os.PathLike[str]) -> Manifest:
    try:
        with open(path, "rb") as stream:
            data = stream.read(64 * 1024 + 1)
    except OSError as exc:
        raise ReleaseError(f"{path}: cannot read manifest ({exc.strerror})") from None
    return parse_manifest(data)


def publish_release(from_dir: str, ota_dir: str) -> Manifest:
    """Copy artifacts first (each fsynced), then the version's kept pair, then the current pair.

    The kept pair (releases/<version>/) comes before the current one, so every version
    /manifest names also answers at /releases/<version>/manifest. Publishing a version
    again (e.g. after `otad-release refresh`) replaces its kept pair too.

    A poller may still read the new manifest with the old bundle (or the
    reverse) when its two requests straddle the switch; gateways and
    robots fetch the pair again once when it does not verify.
    """
    src, dst = Path(from_dir), Path(ota_dir)
    manifest_name, bundle_name = pair_names(src)  # OUT as a refresh cut after its commit point left it
    manifest = read_manifest_file(src / manifest_name)
    try:
        check_release_names(manifest)
        manifest_bytes = (src / manifest_name).read_bytes()
        check_digest(digest_file(src / manifest.artifact), manifest)
        check_checksum_file((src / manifest.checksum).read_bytes(), manifest)
        if not (src / manifest.bundle).is_file():
            raise ReleaseError(f"{src / manifest.bundle}: signature file is missing")
        if not (src / bundle_name).is_file():
            raise ReleaseError(f"{src / MANIFEST_BUNDLE} is missing: the manifest is not signed (otad-release sign it)")
        bundle_bytes = (src / bundle_name).read_bytes()
        if bundle_names_manifest(manifest_bytes, bundle_bytes) is False:
            raise ReleaseError(f"{src / MANIFEST_BUNDLE} does not sign this manifest.json (edited after signing? sign it again)")
    except OSError as exc:
        raise ReleaseError(f"{exc.filename}: cannot read release file ({exc.strerror})") from None
    except OtadError as exc:
        raise ReleaseError(f"refusing to publish {manifest.artifact}: {exc}") from None
    make_dirs(dst)
    published = dst / manifest.artifact
    # A published version is immutable: gateways may be half way through it.
    already = published.exists()
    if already and digest_file(published).hex != manifest.sha256:
        raise ReleaseError(f"{published} is already published with different content; bump the version")
    for file_name in manifest.files:
        if not (already and file_name == manifest.artifact):
            atomic_copy(src / file_name, dst / file_name)
    kept = release_folder(dst, manifest.version)
    make_dirs(kept)
    write_manifest_pair(kept, manifest_bytes, bundle_bytes)
    write_manifest_pair(dst, manifest_bytes, bundle_bytes)
    return manifest
