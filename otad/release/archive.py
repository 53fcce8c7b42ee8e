"""Reproducible release archives: the same app folder always gives the same bytes.

Entries are sorted, owned by 0:0 with no user names, timestamped with
SOURCE_DATE_EPOCH (or 0), permission bits normalised to 0644/0755, and the
gzip header carries no name and mtime 0. A `VERSION` file is always the first
entry, so a robot can check that what it unpacked is what the manifest claimed.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

from otad.errors import ReleaseError
from otad.trust.digest import FileDigest
from otad.trust.links import symlink_target_problem

GZIP_LEVEL = 6  # gzip(1)'s default: the speed/size balance `tar czf` users know
COPY_BUFSIZE = 1 << 20


class _HashingWriter(io.RawIOBase):
    """Hashes the compressed stream on its way to disk, saving a second pass."""

    def __init__(self, raw) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self._raw.write(data)

    def digest(self) -> FileDigest:
        return FileDigest(size=self.size, sha256=self._hash.digest())


def write_archive(app_dir: str | os.PathLike[str], version: str, out, mtime: int) -> FileDigest:
    """Write the tar.gz of `app_dir` to the binary stream `out`; return its digest."""
    root = Path(app_dir)
    if not root.is_dir():
        raise ReleaseError(f"{root}: app folder does not exist or is not a folder")
    entries = _collect(root)
    _check_version_file(root, version)
    writer = _HashingWriter(out)
    with gzip.GzipFile(filename="", mode="wb", compresslevel=GZIP_LEVEL, fileobj=writer, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT, copybufsize=COPY_BUFSIZE) as tar:
            version_bytes = (version + "\n").encode("ascii")
            tar.addfile(_info("VERSION", tarfile.REGTYPE, 0o644, mtime, len(version_bytes)), io.BytesIO(version_bytes))
            for rel, st in entries:
                _add(tar, root, rel, st, mtime)
    return writer.digest()


def _collect(root: Path) -> list[tuple[str, os.stat_result]]:
    """Every entry below root, depth first in name order, checked for safety."""
    found: list[tuple[str, os.stat_result]] = []

    def walk(directory: Path, prefix: str) -> None:
        try:
            names = sorted(os.listdir(directory))
        except OSError as exc:
            raise ReleaseError(f"{directory}: cannot list folder ({exc.strerror})") from None
        for name in names:
            rel = prefix + name
            if rel == "VERSION":
                continue  # written from --version, after checking the two agree
            st = os.lstat(directory / name)
            _check_entry(root, rel, st)
            found.append((rel, st))
            if stat.S_ISDIR(st.st_mode):
                walk(directory / name, rel + "/")

    walk(root, "")
    return found


def _check_entry(root: Path, rel: str, st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        problem = symlink_target_problem(rel, os.readlink(root / rel))
        if problem:  # the robots' own rule: a release they would refuse is never built
            raise ReleaseError(f"{rel}: {problem}")
    elif not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise ReleaseError(f"{rel}: device files, fifos and sockets cannot be released")


def _check_version_file(root: Path, version: str) -> None:
    path = root / "VERSION"
    if not os.path.lexists(path):
        return
    if not path.is_file() or path.is_symlink():
        raise ReleaseError(f"{path}: VERSION must be a regular file")
    found = path.read_text(encoding="utf-8", errors="replace").strip()
    if found != version:
        raise ReleaseError(f"{path} says {found[:40]!r} but the release version is {version!r}")


def _info(name: str, kind: bytes, mode: int, mtime: int, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime, info.size = kind, mode, mtime, size
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add(tar: tarfile.TarFile, root: Path, rel: str, st: os.stat_result, mtime: int) -> None:
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        tar.addfile(_info(rel, tarfile.DIRTYPE, 0o755, mtime))
    elif stat.S_ISLNK(mode):
        info = _info(rel, tarfile.SYMTYPE, 0o777, mtime)
        info.linkname = os.readlink(root / rel)
        tar.addfile(info)
    else:
        # Permission bits are normalised: setuid/setgid never leave CI.
        perm = 0o755 if mode & 0o111 else 0o644
        with open(root / rel, "rb") as data:
            size = os.fstat(data.fileno()).st_size
            tar.addfile(_info(rel, tarfile.REGTYPE, perm, mtime, size), data)
