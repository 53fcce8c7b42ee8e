"""Bearer-token files: one `id token` pair per line; `#` comments.

Lookups compare the presented token with every entry in constant time, so a
wrong token does not reveal, by timing, how much of a real one it matched.
Tokens are never logged.
"""
from __future__ import annotations

import hmac
import os
from pathlib import Path

from otad.errors import ConfigError

MIN_TOKEN_LEN = 16


class TokenTable:
    def __init__(self, entries: list[tuple[str, str]]) -> None:
        self._entries = [(ident, token.encode()) for ident, token in entries]

    @classmethod
    def from_file(cls, path: Path) -> "TokenTable":
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read token file ({exc.strerror})") from None
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or len(parts[1]) < MIN_TOKEN_LEN:
                raise ConfigError(f"{path}:{number}: expected 'ID TOKEN' with a token of at least {MIN_TOKEN_LEN} characters")
            entries.append((parts[0], parts[1]))
        return cls(entries)

    def identify(self, presented: str) -> str | None:
        """The id whose token equals `presented`, or None."""
        candidate = presented.encode()
        found = None
        for ident, token in self._entries:
            if hmac.compare_digest(candidate, token):
                found = ident
        return found


def read_own_token(path: Path) -> str:
    """A daemon's own token (the whole file, stripped), for the Authorization header."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read token file ({exc.strerror})") from None
    if len(token) < MIN_TOKEN_LEN or any(c.isspace() for c in token):
        raise ConfigError(f"{path}: token must be one word of at least {MIN_TOKEN_LEN} characters")
    return token


def bearer(header: str | None) -> str | None:
    if not header or not header.startswith("Bearer "):
        return None
    token = header[len("Bearer "):].strip()
    return token or None


def check_private(path: Path) -> str | None:
    """A warning if a token file is readable by others."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return f"{path} is readable by other users; chmod 600 it" if mode & 0o004 else None
