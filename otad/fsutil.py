"""Crash-safe file primitives: write to a temp file, fsync, rename, fsync the directory.

Every file a daemon or a CLI persists goes through here, so that a `kill -9` or a
power cut at any instant leaves either the old bytes or the new bytes, never a mix.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

COPY_CHUNK = 1 << 20


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or unlink inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(directory: str | os.PathLike[str], mode: int = 0o755) -> None:
    """mkdir -p whose new folders survive a power cut: each one created is made durable
    by an fsync of its parent (mkdir alone, like a create, is lost until then)."""
    missing: list[Path] = []
    path = Path(directory)
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=mode)
        except FileExistsError:
            if not folder.is_dir():
                raise
        fsync_dir(folder.parent)


def _temp_beside(path: Path) -> tuple[int, str]:
    # The temp file must live in the target's directory: rename(2) is only atomic
    # within one filesystem.
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` atomically and durably."""
    atomic_write_stream(path, io.BytesIO(data), mode)


def atomic_write_stream(path: str | os.PathLike[str], source: BinaryIO, mode: int = 0o644) -> None:
    """Like atomic_write_bytes, copying from an open binary stream in bounded chunks."""
    target = Path(path)
    fd, tmp = _temp_beside(target)
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, COPY_CHUNK)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(target.parent)


def atomic_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str], mode: int = 0o644) -> None:
    with open(src, "rb") as source:
        atomic_write_stream(dst, source, mode)


def create_exclusive(path: str | os.PathLike[str], data: bytes, mode: int) -> None:
    """Write a new file that must not exist yet (O_EXCL), durably.

    Used for secrets: the file is created with its final mode, so it is never
    readable by others, not even for an instant.
    """
    target = Path(path)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        _unlink_quietly(str(target))
        raise
    fsync_dir(target.parent)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
