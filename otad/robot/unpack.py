"""Hostile-input-safe unpacking of a release archive into one folder.

Rejected (the whole archive): absolute names, `..` components, members whose
path passes through a symlink, symlinks whose target is absolute or has a `..`
anywhere but at its start (or more leading `..` than the link is deep), hard
links to anything but a file already unpacked, device files, fifos, duplicate
names, more than `max_files` members or `max_bytes` of content (a gzip bomb
stops at the limit, not at a full disk), and an archive whose `VERSION` differs
from the manifest's. Extended headers (PAX records, GNU long names) are capped
in size, in number per member and in records per member (global ones included),
and sparse files are refused, because tarfile reads those into memory whole.
Setuid, setgid and sticky bits and group/other write bits are dropped. Files
are written with O_EXCL|O_NOFOLLOW and fsynced, folders fsynced, before the
caller may activate.

Memory does not grow with the member count: the unpacker keeps no list of
members, names, links or folders (tarfile's own member list is emptied as it
goes), duplicates are found on disk, folders waiting for their fsync are a
bounded set, and gzip is decompressed in bounded reads.
"""
from __future__ import annotations

import gzip
import os
import posixpath
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from otad.errors import TrustError
from otad.trust.links import symlink_target_problem

CHUNK = 64 * 1024  # larger chunks cost page faults in tarfile's temporary buffers (docs/benchmarks.md)
MAX_HEADER_BYTES = 16 * 1024  # one PAX or GNU long-name header: a path and a link target of 4 KiB fit
MAX_HEADER_CHAIN = 8  # extended headers before one member; tarfile recurses once per header
# PAX records that apply to one member, global ones included: tarfile copies and walks them
# all for every member, so thousands of tiny global records cost per member, not once.
MAX_PAX_RECORDS = 128
MAX_PENDING_DIRS = 256  # folders written to but not yet fsynced; more: fsync them now
_EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)


class UnsafeArchive(TrustError):
    """The archive tries to do something a release must never do."""


class _GuardedTarInfo(tarfile.TarInfo):
    """Checks what tarfile would otherwise trust while it reads a header, before the unpacker sees the member.

    tarfile reads an extended header's data whole into memory (a 2 GiB PAX header
    is 4 GiB of RAM), recurses once per header (thousands in a row end in
    RecursionError), merges global PAX headers into one dict that every later
    member copies and walks, and reads a sparse file's map into an unbounded list.
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
            member = super()._proc_member(tar)
        finally:
            tar._otad_header_chain = depth
        # A member without headers of its own carries only the global records, which were
        # counted here, at the member after the global header that set them.
        if depth == 0 and len(member.pax_headers) > MAX_PAX_RECORDS:
            raise UnsafeArchive(f"{len(member.pax_headers)} PAX records for one member, global ones included "
                                f"(at most {MAX_PAX_RECORDS})")
        return member

    def _refuse_sparse(self, member, *_):
        raise UnsafeArchive(f"{member.name[:80]!r}: sparse files are refused")

    # GNU sparse formats 0.0, 0.1 and 1.0, announced in PAX records (1.0 reads its map from the data).
    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _refuse_sparse


class _PendingDirs:
    """Folders that got a new entry since their last fsync: a bounded set, flushed when full and at the end.

    A folder fsynced early and written to again is added again, so each one's last
    change is followed by an fsync before unpack_release returns.
    """

    def __init__(self) -> None:
        self.paths: set[str] = set()

    def add(self, path: str | os.PathLike[str]) -> None:
        self.paths.add(os.fspath(path))
        if len(self.paths) >= MAX_PENDING_DIRS:
            self.flush()

    def flush(self) -> None:
        for path in sorted(self.paths, key=len, reverse=True):  # children before their parents
            _fsync_dir(path)
        self.paths.clear()


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Each member once, none kept: TarFile.members would hold every header (each with
    its copy of the global PAX records) until the archive ends."""
    while (member := tar.next()) is not None:
        tar.members.clear()
        yield member


def unpack_release(archive: Path, dest: Path, version: str, max_bytes: int, max_files: int,
                   progress: Callable[[int], None] | None = None) -> int:
    """Unpack `archive` into the new folder `dest`; return the number of bytes written.

    `progress(n)` is called with the number of archive bytes read so far, each time
    the unpacker reads more of it (the caller's heartbeat: a long unpack is progress).
    """
    dest.mkdir(mode=0o755)
    unpacker = _Unpacker(dest, max_bytes)
    try:
        # gzip.GzipFile decompresses at most what is asked for; tarfile's own "r|gz" keeps up to
        # a thousand times its 10 KiB read in a buffer that it copies again for every header read.
        with open(archive, "rb") as raw, gzip.GzipFile(fileobj=_ReadProgress(raw, progress), mode="rb") as unzipped, \
                tarfile.open(fileobj=unzipped, mode="r|", tarinfo=_GuardedTarInfo) as tar:
            for files, member in enumerate(_members(tar), start=1):
                if files > max_files:
                    raise UnsafeArchive(f"archive has more than {max_files} entries")
                unpacker.member(tar, member)
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as exc:  # ValueError: a robot rejects, never crashes
        if isinstance(exc, OSError) and exc.errno in (28, 122):  # ENOSPC, EDQUOT
            raise
        if isinstance(exc, gzip.BadGzipFile):
            raise UnsafeArchive(f"archive cannot be unpacked: not a gzip file, or a damaged one ({exc})") from None
        raise UnsafeArchive(f"archive cannot be unpacked: {exc}") from None
    _check_version(dest, version)
    unpacker.pending.flush()
    return unpacker.total


class _Unpacker:
    """One member at a time, with constant state: the byte count, the folders awaiting fsync
    (bounded) and the last member's folder."""

    def __init__(self, dest: Path, max_bytes: int) -> None:
        self.dest, self.max_bytes, self.total = dest, max_bytes, 0
        self.pending = _PendingDirs()
        self.pending.add(dest)
        self.checked_parent = ""  # the last member's folder, known to be a chain of real folders

    def member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        dest = self.dest
        name = _member_name(member.name)
        parent = posixpath.dirname(name)
        # A folder checked once stays a real folder: nothing is ever removed or replaced.
        if parent != self.checked_parent:
            for created in _check_parents(dest, name):
                self.pending.add(created)
                self.pending.add(created.parent)
            self.checked_parent = parent
        target = dest / name
        _check_new(name, target, member)
        if member.isdir():
            if not target.is_dir():
                target.mkdir(mode=0o755)
                self.pending.add(target)
        elif member.isfile():
            if self.total + member.size > self.max_bytes:
                raise UnsafeArchive(f"unpacked size exceeds {self.max_bytes // 2**20} MiB")
            self.total += _write_file(tar, member, target)
        elif member.issym():
            problem = symlink_target_problem(name, member.linkname)
            if problem:
                raise UnsafeArchive(f"{name}: {problem}")
            os.symlink(member.linkname, target)
        elif member.islnk():
            source = _member_name(member.linkname)
            _check_parents(dest, source, creating=False)
            if not (dest / source).is_file() or (dest / source).is_symlink():
                raise UnsafeArchive(f"{name}: hard link to {member.linkname!r}, which is not a file of this release")
            os.link(dest / source, target)
        else:
            raise UnsafeArchive(f"{name}: device files, fifos and other special files are refused")
        self.pending.add(target.parent)


class _ReadProgress:
    """The archive file, telling `progress` how far into it the unpacker has read."""

    def __init__(self, raw, progress: Callable[[int], None] | None) -> None:
        self._raw, self._progress, self._read = raw, progress, 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._read += len(data)
        if data and self._progress is not None:  # gzip reads past the end too: that is no progress
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
    return created


def _check_new(name: str, target: Path, member: tarfile.TarInfo) -> None:
    """Found on disk, not in a list of names: only a folder may appear again, as a folder."""
    if os.path.lexists(target) and not (member.isdir() and target.is_dir() and not target.is_symlink()):
        raise UnsafeArchive(f"{name}: appears twice in the archive")


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


def _fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
