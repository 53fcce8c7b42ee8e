"""The version an archive says it holds: its first member, `VERSION`, read without unpacking.

`otad-release build` always writes `VERSION` (the version and a newline) as a
plain ustar entry at the very start of the tar stream. Reading the first two
512-byte blocks of the decompressed stream is enough to compare it with the
manifest, so the gateway can refuse a mix-and-matched release (a signed
archive of one version relabelled as another) before serving it, at the cost
of decompressing one KiB. The robot checks `VERSION` again when it unpacks.
"""
from __future__ import annotations

import os
import zlib

from otad.errors import ChecksumMismatch, MalformedMetadata

BLOCK = 512
MAX_COMPRESSED_READ = 64 * 1024  # a real header is a few dozen bytes into the gzip stream
MAX_VERSION_BYTES = 128


def archive_version(path: str | os.PathLike[str]) -> str:
    """The text of the archive's first member, which must be a regular file `VERSION`."""
    head = _decompressed_head(path, 2 * BLOCK)
    if len(head) < 2 * BLOCK:
        raise MalformedMetadata("archive is too short to hold its VERSION file")
    header = head[:BLOCK]
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
    typeflag = header[156:157]
    if name != b"VERSION" or prefix or typeflag not in (b"0", b"\0"):
        raise MalformedMetadata("archive does not start with its VERSION file (otad-release build writes it first)")
    if not _checksum_ok(header):
        raise MalformedMetadata("archive's first tar header has a bad checksum")
    try:
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise MalformedMetadata("archive's VERSION entry has an invalid size") from None
    if not 0 < size <= MAX_VERSION_BYTES:
        raise MalformedMetadata("archive's VERSION entry is empty or too large")
    text = head[BLOCK:BLOCK + size]
    try:
        return text.decode("ascii").removesuffix("\n")
    except UnicodeDecodeError:
        raise MalformedMetadata("archive's VERSION is not ASCII") from None


def check_archive_version(path: str | os.PathLike[str], version: str) -> None:
    found = archive_version(path)
    if found != version:
        raise ChecksumMismatch(f"archive VERSION says {found[:40]!r}, the manifest says {version!r}")


def _decompressed_head(path: str | os.PathLike[str], want: int) -> bytes:
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing
    out = b""
    read = 0
    try:
        with open(path, "rb") as stream:
            while len(out) < want and read < MAX_COMPRESSED_READ:
                data = inflater.unconsumed_tail or stream.read(4096)
                if not data:
                    break
                if not inflater.unconsumed_tail:
                    read += len(data)
                out += inflater.decompress(data, want - len(out))
                if inflater.eof:
                    break
    except zlib.error:
        raise MalformedMetadata("archive is not a gzip stream") from None
    return out


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
    return stored == computed
