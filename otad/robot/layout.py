"""APP_DIR on disk: releases/<version>/ trees and the NEW, CURRENT, OLD symlinks.

    APP_DIR/releases/1.2.3/       an unpacked release (never changed once complete)
    APP_DIR/releases/1.2.3.ok     written (fsynced) when that tree is complete
    APP_DIR/CURRENT -> releases/1.2.3
    APP_DIR/OLD     -> releases/1.2.2
    APP_DIR/NEW     -> releases/1.2.4   (only between unpack and activation)

Links are relative, so APP_DIR can be bind-mounted elsewhere. A link is
replaced by creating a fresh link under a temporary name and rename(2)-ing
it over the old one: there is never a moment without a valid CURRENT.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from otad.fsutil import atomic_write_bytes, fsync_dir, make_dirs

LINKS = ("CURRENT", "OLD", "NEW")


class AppDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.releases = root / "releases"

    def ensure(self) -> None:
        make_dirs(self.releases)

    def release_dir(self, version: str) -> Path:
        return self.releases / version

    def marker(self, version: str) -> Path:
        return self.releases / f"{version}.ok"

    def is_complete(self, version: str) -> bool:
        return self.marker(version).is_file() and self.release_dir(version).is_dir()

    def mark_complete(self, version: str, sha256: str) -> None:
        atomic_write_bytes(self.marker(version), (sha256 + "\n").encode())

    def target(self, link: str) -> str | None:
        """The version a link points at, or None if it does not exist or is foreign."""
        try:
            value = os.readlink(self.root / link)
        except OSError:
            return None
        head, _, version = value.partition("/")
        return version if head == "releases" and version and "/" not in version else None

    def set_link(self, link: str, version: str) -> None:
        tmp = self.root / f".{link}.tmp"
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        os.symlink(f"releases/{version}", tmp)
        os.replace(tmp, self.root / link)
        fsync_dir(self.root)

    def remove_link(self, link: str) -> None:
        try:
            (self.root / link).unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.root)

    def remove_release(self, version: str) -> None:
        # The marker goes first: a half-deleted tree must never look complete.
        try:
            self.marker(version).unlink()
        except FileNotFoundError:
            pass
        shutil.rmtree(self.release_dir(version), ignore_errors=True)

    def versions_on_disk(self) -> set[str]:
        found = set()
        for entry in self.releases.iterdir():
            found.add(entry.name.removesuffix(".ok").removesuffix(".tmp"))
        return found

    def gc(self, keep: set[str]) -> list[str]:
        """Remove every release tree that is not in `keep`."""
        removed = []
        for version in sorted(self.versions_on_disk() - keep):
            self.remove_release(version)
            removed.append(version)
        if removed:
            fsync_dir(self.releases)
        return removed
