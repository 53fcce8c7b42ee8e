"""Minimal PEM framing: one labelled block, base64 body, 64-column lines."""
from __future__ import annotations

import base64
import binascii
import re

from otad.errors import KeyFileError

_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.S)
MAX_PEM_BYTES = 64 * 1024


def decode_pem(data: bytes, what: str) -> tuple[str, bytes]:
    """Return (label, DER body) of the first PEM block in `data`."""
    if len(data) > MAX_PEM_BYTES:
        raise KeyFileError(f"{what}: file is larger than {MAX_PEM_BYTES} bytes, not a key")
    match = _BLOCK.search(data)
    if match is None:
        raise KeyFileError(f"{what}: no complete PEM block (file truncated or not a key)")
    try:
        body = base64.b64decode(b"".join(match[2].split()), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{what}: PEM body is not valid base64 (file truncated or corrupted)") from None
    return match[1].decode("ascii"), body


def encode_pem(label: str, body: bytes) -> bytes:
    b64 = base64.b64encode(body).decode("ascii")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return ("-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label, "\n".join(lines), label)).encode("ascii")
