"""manifest.json and manifest.json.bundle on disk: written so that a power cut at any instant leaves a pair.

The two files must change together, and two renames are never one atomic step: a cut
between them left the new bundle beside the old manifest (or the reverse), a pair that
verifies for nobody, and a dashboard restarted on it served no release at all. So the
new pair is first staged, durably, under names no reader serves:

1. `.manifest.json.bundle.next` (the new bundle), fsynced and its folder fsynced;
2. `.manifest.json.next` (the new manifest), likewise: **the commit point**;
3. the staged bundle is renamed over manifest.json.bundle, the folder fsynced;
4. the staged manifest is renamed over manifest.json, the folder fsynced.

Readers take the pair from `pair_names`: while `.manifest.json.next` exists, it and
the newest bundle (staged, or already renamed in) are the pair; otherwise
manifest.json and manifest.json.bundle. The order makes every state a cut can leave
unambiguous without looking into the signature (gpg signatures name no digest). A
writer first finishes a pair an interrupted writer committed (steps 3-4), so a stale
staged manifest never meets a newer bundle. Needs only what tests/lazyfs.py models: data
durable after fsync, names after an fsync of their folder, rename atomic.
"""
from __future__ import annotations

import os
from pathlib import Path

from otad.fsutil import atomic_write_bytes, fsync_dir
from otad.semver import Version
from otad.trust.metadata import MANIFEST, MANIFEST_BUNDLE

MANIFEST_NEXT = "." + MANIFEST + ".next"
BUNDLE_NEXT = "." + MANIFEST_BUNDLE + ".next"
RELEASES_DIR = "releases"


def release_folder(ota_dir: Path, version: str) -> Path:
    """OTA_DIR/releases/<version>/: the manifest pair kept for one published version.
    The version is checked first (strict syntax, no path separator can get through)."""
    return ota_dir / RELEASES_DIR / Version(version).text


def pair_names(folder: Path) -> tuple[str, str]:
    """The file names of the manifest and its bundle that form `folder`'s current pair."""
    if (folder / MANIFEST_NEXT).is_file():
        return MANIFEST_NEXT, BUNDLE_NEXT if (folder / BUNDLE_NEXT).is_file() else MANIFEST_BUNDLE
    return MANIFEST, MANIFEST_BUNDLE


def write_manifest_pair(folder: Path, data: bytes, bundle: bytes) -> None:
    """Replace `folder`'s manifest.json and manifest.json.bundle by `data` and `bundle`, as one durable step."""
    finish_manifest_pair(folder)
    atomic_write_bytes(folder / BUNDLE_NEXT, bundle)
    atomic_write_bytes(folder / MANIFEST_NEXT, data)
    finish_manifest_pair(folder)


def finish_manifest_pair(folder: Path) -> None:
    """Rename a committed staged pair in (steps 3-4); drop a staged bundle that never got its manifest."""
    if not (folder / MANIFEST_NEXT).is_file():
        (folder / BUNDLE_NEXT).unlink(missing_ok=True)  # cut before the commit point: readers ignore it
        return
    if (folder / BUNDLE_NEXT).is_file():
        os.replace(folder / BUNDLE_NEXT, folder / MANIFEST_BUNDLE)
        # Durable before the manifest moves: a staged manifest must never be left beside the old bundle.
        fsync_dir(folder)
    os.replace(folder / MANIFEST_NEXT, folder / MANIFEST)
    fsync_dir(folder)
