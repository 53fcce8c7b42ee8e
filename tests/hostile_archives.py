"""A corpus of hostile release archives for the robot's unpacker (issue 4, section 3).

Every builder writes one `.tar.gz` into `folder` and returns its path. Apart
from its one trick, each archive looks like a real release (docs/formats.md):
PAX format, gzip, a `VERSION` file first with the right version, a `bin/app`.
`otad-release build` refuses to produce any of these, so they are written here
with tarfile and zlib directly (and, where tarfile will not write the trick,
with raw 512-byte tar headers).

`outside` is a folder the test owns, standing in for `/tmp` and `/etc`: absolute
names and link targets point into it, so a test can check that nothing reached
them without touching the real ones. It holds a file `passwd` (see `prepare_outside`).

CASES is a list of (case_id, builder, expected_reason_fragment); a fragment of
None means the archive must unpack (with its dangerous mode bits dropped).
The limits the unpacker is called with are LIMIT_BYTES and LIMIT_FILES.

Not in the corpus, because tarfile cannot write them and they cannot exist in
a tar stream anyway: sockets (tar has no type for them; `tarfile.gettarinfo`
refuses them). A member name with a NUL byte cannot be stored in a ustar name
field (it is a NUL-terminated string), so the NUL case uses a PAX `path` record,
which can carry one.
"""
from __future__ import annotations

import io
import os
import struct
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

MIB = 1 << 20
GIB = 1 << 30
LIMIT_BYTES = 64 * MIB   # max_bytes the tests give unpack_release
LIMIT_FILES = 64         # max_files the tests give unpack_release
BOMB_SIZE = 2 * GIB      # declared (and real) size of the gzip bomb's member
HEADER_BOMB_SIZE = 256 * MIB  # size of the PAX / GNU long-name header bombs


def prepare_outside(outside: Path) -> None:
    """The stand-in for the rest of the file system: a folder with a file to aim at."""
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "passwd").write_bytes(b"root:x:0:0:root:/root:/bin/sh\n")


class _Zeros(io.RawIOBase):
    """`size` zero bytes, produced as they are read: the bomb is never held in memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


class GzipWriter(io.RawIOBase):
    """A gzip file (RFC 1952: no name, mtime 0), with one shortcut for bombs.

    After a full flush a deflate stream starts afresh, so a 1 MiB chunk of zeros
    written after one always compresses to the same ~1 KiB: that block is computed
    once and repeated. A 2 GiB bomb then takes a second to write, not ten.
    """

    ZEROS = bytes(MIB)

    def __init__(self, path: Path, level: int) -> None:
        self.out = open(path, "wb")
        self.level = level
        self.deflate = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
        self.crc = self.size = 0
        self.fresh = True  # nothing compressed since the last full flush
        self.zero_block = b""
        self.out.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, data) -> int:
        data = bytes(data)
        self.crc, self.size = zlib.crc32(data, self.crc), self.size + len(data)
        if data == self.ZEROS:
            if not self.fresh:
                self.out.write(self.deflate.flush(zlib.Z_FULL_FLUSH))
                self.fresh = True
            if not self.zero_block:
                once = zlib.compressobj(self.level, zlib.DEFLATED, -zlib.MAX_WBITS)
                self.zero_block = once.compress(data) + once.flush(zlib.Z_FULL_FLUSH)
            self.out.write(self.zero_block)
        else:
            self.out.write(self.deflate.compress(data))
            self.fresh = False
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self.out.write(self.deflate.flush(zlib.Z_FINISH))
            self.out.write(struct.pack("<II", self.crc, self.size & 0xFFFFFFFF))
            self.out.close()
        super().close()


class Release:
    """Write a release-shaped archive: VERSION first, then bin/app, then whatever the case adds."""

    def __init__(self, path: Path, version: str | None, *, version_text: str | None = None, app: bool = True,
                 level: int = 6) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._gz = GzipWriter(path, level)
        self.tar = tarfile.open(fileobj=self._gz, mode="w", format=tarfile.PAX_FORMAT, copybufsize=MIB)
        if version is not None:
            self.file("VERSION", ((version_text if version_text is not None else version) + "\n").encode())
        if app:
            self.file("bin/app", b"#!/bin/sh\necho app\n", 0o755)

    def __enter__(self) -> "Release":
        return self

    def __exit__(self, *exc) -> None:
        self.tar.close()
        self._gz.close()

    @staticmethod
    def info(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, size: int = 0) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.size, info.mtime = kind, mode, size, 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    def file(self, name: str, data: bytes = b"", mode: int = 0o644) -> None:
        self.tar.addfile(self.info(name, mode=mode, size=len(data)), io.BytesIO(data))

    def zeros(self, name: str, size: int) -> None:
        self.tar.addfile(self.info(name, size=size), io.BufferedReader(_Zeros(size), MIB))

    def folder(self, name: str, mode: int = 0o755) -> None:
        self.tar.addfile(self.info(name, tarfile.DIRTYPE, mode))

    def symlink(self, name: str, target: str, pax: dict[str, str] | None = None) -> None:
        info = self.info(name, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        info.pax_headers = pax or {}
        self.tar.addfile(info)

    def hardlink(self, name: str, target: str) -> None:
        info = self.info(name, tarfile.LNKTYPE)
        info.linkname = target
        self.tar.addfile(info)

    def special(self, name: str, kind: bytes, major: int = 0, minor: int = 0) -> None:
        info = self.info(name, kind, 0o666)
        info.devmajor, info.devminor = major, minor
        self.tar.addfile(info)

    def raw(self, header: bytes, data: io.RawIOBase | bytes | None = None, size: int = 0) -> None:
        """Blocks tarfile would never write on its own: a header, then `size` bytes of data, padded."""
        self.tar.fileobj.write(header)
        self.tar.offset += len(header)
        if data is not None and size:
            source = io.BytesIO(data) if isinstance(data, bytes) else io.BufferedReader(data, MIB)  # full reads
            tarfile.copyfileobj(source, self.tar.fileobj, size, bufsize=MIB)
            padding = -size % tarfile.BLOCKSIZE
            self.tar.fileobj.write(bytes(padding))
            self.tar.offset += size + padding


def _archive(folder: Path, case_id: str) -> Path:
    return folder / f"{case_id}.tar.gz"


Builder = Callable[[Path, str, Path], Path]


# -- names ------------------------------------------------------------------------------
def absolute_member(folder: Path, version: str, outside: Path) -> Path:
    with Release(_archive(folder, "absolute-member"), version) as r:
        r.file(str(outside / "evil"), b"written outside\n")
    return r.path


def dotdot_member(folder: Path, version: str, outside: Path) -> Path:
    with Release(_archive(folder, "dotdot-member"), version) as r:
        r.file("../evil", b"one folder up\n")
    return r.path


def dotdot_inside_member(folder: Path, version: str, outside: Path) -> Path:
    with Release(_archive(folder, "dotdot-inside-member"), version) as r:
        r.file("a/../../evil", b"normalises to ../evil\n")
    return r.path


def nul_in_name(folder: Path, version: str, outside: Path) -> Path:
    # A ustar name field is NUL-terminated; a PAX `path` record is length-prefixed and can hold one.
    with Release(_archive(folder, "nul-in-name"), version) as r:
        info = r.info("bin/tool", size=3)
        info.pax_headers = {"path": "bin/tool\0../../evil"}
        r.tar.addfile(info, io.BytesIO(b"hi\n"))
    return r.path


def empty_name(folder: Path, version: str, outside: Path) -> Path:
    with Release(_archive(folder, "empty-name"), version) as r:
        r.file("", b"nameless\n")
    return r.path


# -- symlinks ---------------------------------------------------------------------------
def symlink_absolute(folder: Path, version: str, outside: Path) -> Path:
    with Release(_archive(folder, "symlink-absolute"), version) as r:
        r.symlink("etc/passwd", str(outside / "passwd"))
    return r.path


def symlink_dotdot(folder: Path, version: str, outside: Path) -> Path:
    with Release(_archive(folder, "symlink-dotdot"), version) as r:
        r.symlink("lib/escape", "../../../outside/passwd")
    return r.path


def symlink_chain_escape(folder: Path, version: str, outside: Path) -> Path:
    # Each target is harmless on its own, read lexically: `sub/up` -> `..` is the release
    # root and `esc` -> `sub/up/..` normalises to `sub`. On disk, `sub/up/..` is the
    # parent of the release root, so `esc` leaves the release.
    with Release(_archive(folder, "symlink-chain-escape"), version) as r:
        r.folder("sub")
        r.symlink("sub/up", "..")
        r.symlink("esc", "sub/up/..")
    return r.path


def symlink_nul_target(folder: Path, version: str, outside: Path) -> Path:
    # A PAX `linkpath` record can hold a NUL; unchecked, os.symlink raises ValueError, not OSError.
    with Release(_archive(folder, "symlink-nul-target"), version) as r:
        r.symlink("bin/link", "app", pax={"linkpath": "app\0/../../evil"})
    return r.path


def write_through_symlink_dir(folder: Path, version: str, outside: Path) -> Path:
    # `d` -> `sub` is harmless; a member `d/x` is written through it, which the unpacker refuses.
    with Release(_archive(folder, "write-through-symlink-dir"), version) as r:
        r.folder("sub")
        r.symlink("d", "sub")
        r.file("d/x", b"through a link\n")
    return r.path


def write_through_symlink_dot(folder: Path, version: str, outside: Path) -> Path:
    with Release(_archive(folder, "write-through-symlink-dot"), version) as r:
        r.symlink("up", ".")
        r.file("up/../../evil", b"through a link, then up\n")
    return r.path


def write_through_escaping_symlink(folder: Path, version: str, outside: Path) -> Path:
    # The link itself is refused; were it not, `out/evil` would land in `outside`.
    with Release(_archive(folder, "write-through-escaping-symlink"), version) as r:
        r.symlink("out", str(outside))
        r.file("out/evil", b"in outside\n")
    return r.path


# -- hard links -------------------------------------------------------------------------
def hardlink_absolute(folder: Path, version: str, outside: Path) -> Path:
    with Release(_archive(folder, "hardlink-absolute"), version) as r:
        r.hardlink("etc/passwd", str(outside / "passwd"))
    return r.path


def hardlink_dotdot(folder: Path, version: str, outside: Path) -> Path:
    with Release(_archive(folder, "hardlink-dotdot"), version) as r:
        r.hardlink("x", "../x")
    return r.path


def hardlink_forward(folder: Path, version: str, outside: Path) -> Path:
    with Release(_archive(folder, "hardlink-forward"), version) as r:
        r.hardlink("early", "bin/later")
        r.file("bin/later", b"not there yet when linked\n")
    return r.path


def hardlink_through_symlink(folder: Path, version: str, outside: Path) -> Path:
    with Release(_archive(folder, "hardlink-through-symlink"), version) as r:
        r.folder("sub")
        r.file("sub/f", b"f\n")
        r.symlink("s", "sub")
        r.hardlink("h", "s/f")
    return r.path


# -- special files ----------------------------------------------------------------------
def char_device(folder: Path, version: str, outside: Path) -> Path:
    with Release(_archive(folder, "char-device"), version) as r:
        r.special("dev/mem", tarfile.CHRTYPE, 1, 1)
    return r.path


def block_device(folder: Path, version: str, outside: Path) -> Path:
    with Release(_archive(folder, "block-device"), version) as r:
        r.special("dev/sda", tarfile.BLKTYPE, 8, 0)
    return r.path


def fifo(folder: Path, version: str, outside: Path) -> Path:
    with Release(_archive(folder, "fifo"), version) as r:
        r.special("run/pipe", tarfile.FIFOTYPE)
    return r.path


def setuid_setgid(folder: Path, version: str, outside: Path) -> Path:
    """Not refused: unpacks, with setuid/setgid/sticky and group/other write dropped."""
    with Release(_archive(folder, "setuid-setgid"), version) as r:
        r.file("bin/su", b"#!/bin/sh\nid\n", 0o6755)
        r.file("bin/wide-open", b"#!/bin/sh\nid\n", 0o6777)
        r.file("etc/shared.conf", b"x=1\n", 0o666)
        r.folder("tmp", 0o1777)
    return r.path


# -- sizes and counts -------------------------------------------------------------------
def gzip_bomb(folder: Path, version: str, outside: Path) -> Path:
    # 2 GiB of zeros, streamed through gzip (about 1000:1): a ~2 MiB archive.
    with Release(_archive(folder, "gzip-bomb"), version, level=9) as r:
        r.zeros("data/zeros.bin", BOMB_SIZE)
    return r.path


def many_files_over_size(folder: Path, version: str, outside: Path) -> Path:
    # No single member is large; together they pass LIMIT_BYTES (the total must be counted).
    with Release(_archive(folder, "many-files-over-size"), version, level=9) as r:
        for i in range(LIMIT_BYTES // (8 * MIB) + 2):
            r.zeros(f"data/part{i:02d}.bin", 8 * MIB)
    return r.path


def too_many_files(folder: Path, version: str, outside: Path) -> Path:
    with Release(_archive(folder, "too-many-files"), version) as r:
        for i in range(LIMIT_FILES * 3):
            r.file(f"data/f{i:04d}", b"")
    return r.path


def pax_header_bomb(folder: Path, version: str, outside: Path) -> Path:
    # An extended header declaring 256 MiB of records: tarfile reads a header's data whole
    # into memory before it parses it, so this is a memory bomb, not a disk bomb.
    with Release(_archive(folder, "pax-header-bomb"), version, level=9) as r:
        r.raw(Release.info("././@PaxHeader", tarfile.XHDTYPE, size=HEADER_BOMB_SIZE).tobuf(tarfile.USTAR_FORMAT),
              _Zeros(HEADER_BOMB_SIZE), HEADER_BOMB_SIZE)
        r.file("bin/tool", b"after the header\n")
    return r.path


def gnu_longname_bomb(folder: Path, version: str, outside: Path) -> Path:
    # The same through a GNU long-name block (type L), which tarfile also reads whole.
    with Release(_archive(folder, "gnu-longname-bomb"), version, level=9) as r:
        r.raw(Release.info("././@LongLink", tarfile.GNUTYPE_LONGNAME, size=HEADER_BOMB_SIZE).tobuf(tarfile.GNU_FORMAT),
              _Zeros(HEADER_BOMB_SIZE), HEADER_BOMB_SIZE)
        r.file("bin/tool", b"after the header\n")
    return r.path


def pax_header_chain(folder: Path, version: str, outside: Path) -> Path:
    # Thousands of small extended headers in a row: tarfile handles each by recursing
    # into the next header, so unchecked this ends in RecursionError, not a TarError.
    record = tarfile.TarInfo._create_pax_generic_header({"comment": "x"}, tarfile.XHDTYPE, "utf-8")
    with Release(_archive(folder, "pax-header-chain"), version) as r:
        for _ in range(3000):
            r.raw(record)
        r.file("bin/tool", b"after the headers\n")
    return r.path


def sparse_map_bomb(folder: Path, version: str, outside: Path) -> Path:
    # A GNU sparse 1.0 member (PAX GNU.sparse.* records): its map, at the start of the
    # member's data, declares 2**40 entries. tarfile reads the whole map into a list while
    # reading the header, before the unpacker sees the member: 32 Mi entries follow.
    entries = 32 * MIB
    data_size = len(b"%d\n" % (1 << 40)) + 2 * entries
    with Release(_archive(folder, "sparse-map-bomb"), version, level=9) as r:
        pax = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "data/sparse.bin",
               "GNU.sparse.realsize": "4096"}
        r.raw(tarfile.TarInfo._create_pax_generic_header(pax, tarfile.XHDTYPE, "utf-8"))
        header = Release.info("data/GNUSparseFile.0/sparse.bin", size=data_size).tobuf(tarfile.USTAR_FORMAT)

        class Map(io.RawIOBase):
            def __init__(self) -> None:
                self.pending = b"%d\n" % (1 << 40)
                self.left = entries

            def readable(self) -> bool:
                return True

            def readinto(self, buffer) -> int:
                if not self.pending and self.left:
                    n = min(self.left, len(buffer) // 2)
                    self.pending, self.left = b"0\n" * n, self.left - n
                n = min(len(buffer), len(self.pending))
                buffer[:n], self.pending = self.pending[:n], self.pending[n:]
                return n

        r.raw(header, Map(), data_size)
    return r.path


def old_gnu_sparse(folder: Path, version: str, outside: Path) -> Path:
    # An old-GNU sparse member (type S) whose extension blocks never end (each says
    # "another block follows"): tarfile collects their entries into a list, unbounded.
    blocks = 64 * MIB // tarfile.BLOCKSIZE
    header = bytearray(Release.info("data/sparse.bin", tarfile.GNUTYPE_SPARSE, size=0).tobuf(tarfile.GNU_FORMAT))
    header[482] = 1  # isextended
    header[148:156] = b"        "
    header[148:155] = b"%06o\0" % sum(header)  # ustar checksum: 6 octal digits, NUL, space
    entry = b"%011o\0%011o\0" % (1, 1)
    extension = (entry * 21).ljust(504, b"\0") + b"\x01" + bytes(7)

    class Extensions(io.RawIOBase):
        def __init__(self) -> None:
            self.left = blocks

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            n = min(self.left, len(buffer) // tarfile.BLOCKSIZE)
            buffer[:n * tarfile.BLOCKSIZE] = extension * n
            self.left -= n
            return n * tarfile.BLOCKSIZE

    with Release(_archive(folder, "old-gnu-sparse"), version, level=9) as r:
        r.raw(bytes(header), Extensions(), blocks * tarfile.BLOCKSIZE)
    return r.path


def _global_pax_header(data_bytes: int, records: int) -> bytes:
    """A global PAX header (type g) of `records` records in about `data_bytes`: tarfile copies
    every global record into each member's `pax_headers`, so its cost is paid once per member."""
    value = "v" * (data_bytes // records - 12)
    return tarfile.TarInfo._create_pax_generic_header({f"g{i:03d}": value for i in range(records)}, tarfile.XGLTYPE, "utf-8")


def long_dir(depth: int = 4) -> str:
    """A folder path of about 1 KiB (4 components of 250 characters)."""
    return "/".join(f"{n:02d}" + "d" * 248 for n in range(depth))


def member_bomb(folder: Path, version: str, outside: Path, members: int = LIMIT_FILES - 2,
                case_id: str = "member-bomb") -> Path:
    """Legal, and cheap on disk: one global PAX header just under the caps (16 KiB, 128
    records), then `members` symlinks with 1 KiB names (with VERSION and bin/app: exactly
    `members` + 2 entries).

    A member costs a few dozen bytes of gzip and nothing on disk, so an unpacker that keeps
    anything per member (tarfile's member list, each with its copy of the global records, or
    its own lists of names) grows with the count: 25 KiB a member, 2.5 GiB at 100,000."""
    with Release(_archive(folder, case_id), version) as r:
        r.raw(_global_pax_header(16 * 1024 - 512, 120))  # unpack.py: MAX_HEADER_BYTES, MAX_PAX_RECORDS
        base = long_dir()
        for i in range(members):
            r.symlink(f"{base}/l{i:06d}", "target")
    return r.path


def global_pax_pile(folder: Path, version: str, outside: Path) -> Path:
    # Each global header is under the per-header cap and comes in short runs (under the
    # chain cap), but tarfile merges them all into one dict that lives until the end and
    # is copied into every later member: 6 per member add 84 KiB each, unbounded in sum.
    with Release(_archive(folder, "global-pax-pile"), version) as r:
        for n in range(LIMIT_FILES - 2):
            for m in range(6):
                r.raw(tarfile.TarInfo._create_pax_generic_header(
                    {f"{n:02x}{m}{i:02x}": "v" * 200 for i in range(64)}, tarfile.XGLTYPE, "utf-8"))
            r.file(f"data/f{n:02d}", b"")
    return r.path


# -- VERSION ----------------------------------------------------------------------------
def version_mismatch(folder: Path, version: str, outside: Path) -> Path:
    with Release(_archive(folder, "version-mismatch"), version, version_text="99.0.0") as r:
        pass
    return r.path


def version_missing(folder: Path, version: str, outside: Path) -> Path:
    with Release(_archive(folder, "version-missing"), None) as r:
        r.file("lib/data.txt", b"data\n")
    return r.path


def version_symlink(folder: Path, version: str, outside: Path) -> Path:
    with Release(_archive(folder, "version-symlink"), None) as r:
        r.file("version.txt", (version + "\n").encode())
        r.symlink("VERSION", "version.txt")
    return r.path


# -- broken containers ------------------------------------------------------------------
def truncated(folder: Path, version: str, outside: Path) -> Path:
    # Incompressible data, so cutting the gzip in half cuts inside that member's data.
    path = _archive(folder, "truncated")
    with Release(path, version) as r:
        r.file("data/random.bin", os.urandom(256 * 1024))
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    return path


def not_gzip(folder: Path, version: str, outside: Path) -> Path:
    path = _archive(folder, "not-gzip")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:  # a plain, uncompressed tar
        data = (version + "\n").encode()
        tar.addfile(Release.info("VERSION", size=len(data)), io.BytesIO(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return path


def duplicate_file(folder: Path, version: str, outside: Path) -> Path:
    with Release(_archive(folder, "duplicate-file"), version) as r:
        r.file("bin/app", b"#!/bin/sh\necho replaced\n", 0o755)
    return r.path


def file_then_symlink(folder: Path, version: str, outside: Path) -> Path:
    with Release(_archive(folder, "file-then-symlink"), version) as r:
        r.file("lib/data.txt", b"data\n")
        r.symlink("lib/data.txt", str(outside / "passwd"))
    return r.path


CASES: list[tuple[str, Builder, str | None]] = [
    ("absolute-member", absolute_member, "absolute or invalid member name"),
    ("dotdot-member", dotdot_member, "leaves the release folder"),
    ("dotdot-inside-member", dotdot_inside_member, "leaves the release folder"),
    ("nul-in-name", nul_in_name, "absolute or invalid member name"),
    ("empty-name", empty_name, "absolute or invalid member name"),
    ("symlink-absolute", symlink_absolute, "symlink to absolute path"),
    ("symlink-dotdot", symlink_dotdot, "leaves the release folder"),
    ("symlink-chain-escape", symlink_chain_escape, "'..' only at its start"),
    ("symlink-nul-target", symlink_nul_target, "symlink target is empty or holds a NUL byte"),
    ("write-through-symlink-dir", write_through_symlink_dir, "path goes through the symlink 'd'"),
    ("write-through-symlink-dot", write_through_symlink_dot, "leaves the release folder"),
    ("write-through-escaping-symlink", write_through_escaping_symlink, "symlink to absolute path"),
    ("hardlink-absolute", hardlink_absolute, "absolute or invalid member name"),
    ("hardlink-dotdot", hardlink_dotdot, "leaves the release folder"),
    ("hardlink-forward", hardlink_forward, "not a file of this release"),
    ("hardlink-through-symlink", hardlink_through_symlink, "path goes through the symlink 's'"),
    ("char-device", char_device, "device files, fifos"),
    ("block-device", block_device, "device files, fifos"),
    ("fifo", fifo, "device files, fifos"),
    ("setuid-setgid", setuid_setgid, None),
    ("gzip-bomb", gzip_bomb, f"unpacked size exceeds {LIMIT_BYTES // MIB} MiB"),
    ("many-files-over-size", many_files_over_size, f"unpacked size exceeds {LIMIT_BYTES // MIB} MiB"),
    ("too-many-files", too_many_files, f"more than {LIMIT_FILES} entries"),
    ("pax-header-bomb", pax_header_bomb, "header of 268435456 bytes"),
    ("gnu-longname-bomb", gnu_longname_bomb, "header of 268435456 bytes"),
    ("pax-header-chain", pax_header_chain, "extended headers in a row"),
    ("sparse-map-bomb", sparse_map_bomb, "sparse files are refused"),
    ("old-gnu-sparse", old_gnu_sparse, "sparse files are refused"),
    ("member-bomb", member_bomb, None),
    ("global-pax-pile", global_pax_pile, "PAX records for one member"),
    ("version-mismatch", version_mismatch, "archive VERSION says '99.0.0'"),
    ("version-missing", version_missing, "no VERSION file"),
    ("version-symlink", version_symlink, "no VERSION file"),
    ("truncated", truncated, "archive cannot be unpacked"),
    ("not-gzip", not_gzip, "not a gzip file"),
    ("duplicate-file", duplicate_file, "bin/app: appears twice"),
    ("file-then-symlink", file_then_symlink, "lib/data.txt: appears twice"),
]

BUILDERS: dict[str, Builder] = {case_id: builder for case_id, builder, _ in CASES}
REASONS: dict[str, str | None] = {case_id: reason for case_id, _, reason in CASES}
