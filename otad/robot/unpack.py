"""Hostile-input-safe unpacking of a release archive into one folder.

Rejected (the whole archive): absolute names, `..` components, members whose
path passes through a symlink, symlinks or hard links whose target leaves the
folder, device files, fifos, duplicate names, more than `max_files` members or
`max_bytes` of content (a gzip bomb stops at the limit, not at a full disk),
and an archive whose `VERSION` differs from the manifest's. Extended headers
(PAX records, GNU long names) are capped in size and in number per member and
sparse files are refused, because tarfile reads those into memory whole.
Setuid, setgid and sticky bits and group/other write bits are dropped. Files
are written with O_EXCL|O_NOFOLLOW and fsynced, folders fsynced, before the
caller may activate.
"""
from __future__ import annotations

import os
import posixpath
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

from otad.errors import TrustError

CHUNK = 64 * 1024  # larger chunks cost page faults in tarfile's temporary buffers (docs/benchmarks.md)
MAX_HEADER_BYTES = 16 * 1024  # one PAX or GNU long-name header: a path and a link target of 4 KiB fit
MAX_HEADER_CHAIN = 8  # extended headers before one member; tarfile recurses once per header
_EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)


class UnsafeArchive(TrustError):
    """The archive tries to do something a release must never do."""


class _GuardedTarInfo(tarfile.TarInfo):
    """Checks what tarfile would otherwise trust while it reads a header, before the unpacker sees the member.

    tarfile reads an extended header's data whole into memory (a 2 GiB PAX header
    is 4 GiB of RAM), recurses once per header (thousands in a row end in
    RecursionError), and reads a sparse file's map into an unbounded list.
    """

    def _proc_member(self, tar):
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise UnsafeArchive(f"{self.name[:80]!r}: sparse files are refused")
        if self.type not in _EXTENDED:
            return super()._proc_member(tar)
        if self.size > MAX_HEADER_BYTES:
            raise UnsafeArchive(f"extended header of {self.size} bytes (at most {MAX_HEADER_BYTES})")
        depth = getattr(tar, "_otad_header_chain", 0)
        if depth >= MAX_HEADER_CHAIN:
            raise UnsafeArchive(f"more than {MAX_HEADER_CHAIN} extended headers in a row")
        tar._otad_header_chain = depth + 1
        try:
            return super()._proc_member(tar)
        finally:
            tar._otad_header_chain = depth

    def _refuse_sparse(self, member, *_):
        raise UnsafeArchive(f"{member.name[:80]!r}: sparse files are refused")

    # GNU sparse formats 0.0, 0.1 and 1.0, announced in PAX records (1.0 reads its map from the data).
    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _refuse_sparse


def unpack_release(archive: Path, dest: Path, version: str, max_bytes: int, max_files: int,
                   progress: Callable[[int], None] | None = None) -> int:
    """Unpack `archive` into the new folder `dest`; return the number of bytes written.

    `progress(n)` is called with the number of archive bytes read so far, each time
    the unpacker reads more of it (the caller's heartbeat: a long unpack is progress).
    """
    dest.mkdir(mode=0o755)
    total = files = 0
    seen: set[str] = set()
    dirs = [dest]
    links: list[str] = []
    try:
        with open(archive, "rb") as raw, \
                tarfile.open(fileobj=_ReadProgress(raw, progress), mode="r|gz", tarinfo=_GuardedTarInfo) as tar:
            for member in tar:
                files += 1
                if files > max_files:
                    raise UnsafeArchive(f"archive has more than {max_files} entries")
                name = _member_name(member.name)
                if name in seen and not member.isdir():
                    raise UnsafeArchive(f"{name}: appears twice in the archive")
                seen.add(name)
                target = dest / name
                dirs += _check_parents(dest, name)
                if member.isdir():
                    if not target.is_dir():
                        target.mkdir(mode=0o755)
                        dirs.append(target)
                elif member.isfile():
                    if total + member.size > max_bytes:
                        raise UnsafeArchive(f"unpacked size exceeds {max_bytes // 2**20} MiB")
                    total += _write_file(tar, member, target)
                elif member.issym():
                    _check_link_target(name, member.linkname, "symlink")
                    os.symlink(member.linkname, target)
                    links.append(name)
                elif member.islnk():
                    source = _member_name(member.linkname)
                    dirs += _check_parents(dest, source, creating=False)
                    if not (dest / source).is_file() or (dest / source).is_symlink():
                        raise UnsafeArchive(f"{name}: hard link to {member.linkname!r}, which is not a file of this release")
                    os.link(dest / source, target)
                else:
                    raise UnsafeArchive(f"{name}: device files, fifos and other special files are refused")
        _check_links_resolve_inside(dest, links)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:  # ValueError: a robot rejects, never crashes
        if isinstance(exc, OSError) and exc.errno in (28, 122):  # ENOSPC, EDQUOT
            raise
        raise UnsafeArchive(f"archive cannot be unpacked: {exc}") from None
    _check_version(dest, version)
    for directory in reversed(dirs):
        _fsync_dir(directory)
    return total


class _ReadProgress:
    """The archive file, telling `progress` how far into it the unpacker has read."""

    def __init__(self, raw, progress: Callable[[int], None] | None) -> None:
        self._raw, self._progress, self._read = raw, progress, 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._read += len(data)
        if self._progress is not None:
            self._progress(self._read)
        return data


def _member_name(raw: str) -> str:
    if not raw or "\0" in raw or raw.startswith("/") or len(raw) > 4096:
        raise UnsafeArchive(f"{raw[:80]!r}: absolute or invalid member name")
    name = posixpath.normpath(raw)
    if name == "." or name.startswith("../") or name == ".." or "/../" in f"/{raw}/":
        raise UnsafeArchive(f"{raw[:80]!r}: member name leaves the release folder")
    return name


def _check_parents(dest: Path, name: str, creating: bool = True) -> list[Path]:
    """No member may be written through a symlink: that is how links escape a folder.

    Returns the parent folders it had to create (archives may omit folder entries).
    """
    created = []
    current = dest
    for part in Path(name).parts[:-1]:
        current = current / part
        if current.is_symlink():
            raise UnsafeArchive(f"{name}: path goes through the symlink {part!r}")
        if not current.exists():
            if not creating:
                break
            current.mkdir(mode=0o755)
            created.append(current)
    if creating and os.path.lexists(dest / name) and not (dest / name).is_dir():
        raise UnsafeArchive(f"{name}: appears twice in the archive")
    return created


def _check_link_target(name: str, target: str, kind: str) -> None:
    # Parents are real folders (checked above), so a lexical check is exact for the
    # link's own folder; a target passing through other symlinks is checked once the
    # whole tree is on disk (_check_links_resolve_inside).
    if not target or "\0" in target:
        raise UnsafeArchive(f"{name}: {kind} target is empty or holds a NUL byte")
    if target.startswith("/"):
        raise UnsafeArchive(f"{name}: {kind} to absolute path {target[:80]!r}")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
    if resolved == ".." or resolved.startswith("../"):
        raise UnsafeArchive(f"{name}: {kind} target {target[:80]!r} leaves the release folder")


def _check_links_resolve_inside(dest: Path, links: list[str]) -> None:
    """Resolve every symlink for real: lexically harmless targets can still leave through each other.

    `sub/up` -> `..` is the release root and `esc` -> `sub/up/..` normalises to `sub`,
    but on disk `sub/up/..` is the root's parent. Links are resolved after the last
    member because a later member can create the link an earlier target passes through.
    """
    root = os.path.realpath(dest)
    for name in links:
        resolved = os.path.realpath(dest / name)
        if resolved != root and not resolved.startswith(root + os.sep):
            raise UnsafeArchive(f"{name}: symlink target {os.readlink(dest / name)[:80]!r} leaves the release folder")


def _write_file(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> int:
    # Drop setuid/setgid/sticky and group/other write: a release never needs them.
    mode = stat.S_IMODE(member.mode) & 0o755 | 0o600
    source = tar.extractfile(member)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    written = 0
    with os.fdopen(fd, "wb") as out:
        while written < member.size:
            chunk = source.read(min(CHUNK, member.size - written))
            if not chunk:
                raise UnsafeArchive(f"{member.name}: archive ends inside this file")
            out.write(chunk)
            written += len(chunk)
        out.flush()
        os.fchmod(out.fileno(), mode)  # not subject to the umask
        os.fsync(out.fileno())
    return written


def _check_version(dest: Path, version: str) -> None:
    path = dest / "VERSION"
    if path.is_symlink() or not path.is_file():
        raise UnsafeArchive("archive has no VERSION file at its root")
    found = path.read_bytes()[:100].decode("utf-8", "replace").strip()
    if found != version:
        raise UnsafeArchive(f"archive VERSION says {found!r}, the manifest says {version!r}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
