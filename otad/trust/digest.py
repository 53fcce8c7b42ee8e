"""Streaming SHA-256: artifacts can be gigabytes and are never read whole."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import BinaryIO

CHUNK = 1 << 20


@dataclass(frozen=True)
class FileDigest:
    size: int
    sha256: bytes

    @property
    def hex(self) -> str:
        return self.sha256.hex()


def digest_stream(stream: BinaryIO) -> FileDigest:
    hasher = hashlib.sha256()
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        n = stream.readinto(buf)
        if not n:
            break
        hasher.update(view[:n])
        size += n
    return FileDigest(size=size, sha256=hasher.digest())


def digest_file(path: str | os.PathLike[str]) -> FileDigest:
    with open(path, "rb", buffering=0) as stream:
        return digest_stream(stream)
