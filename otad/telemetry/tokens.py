"""Bearer-token files: one `id token` pair per line; `#` comments.

Lookups compare the SHA-256 of the presented token with the SHA-256 of every
entry, each with hmac.compare_digest on equal-length digests, and never stop
early: a wrong token reveals, by timing, neither how much of a real one it
matched nor how long real ones are, nor which entry matched. Several lines may
name one id (rotation: old and new token valid together). Tokens are never logged.

File modes (docs/security.md): a token file others can read or write is
refused (ConfigError, naming the file and the fix); one whose group can read
it gets a warning unless that group is the daemon's own (root:otad 0640).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

from otad.errors import ConfigError

MIN_TOKEN_LEN = 16


class TokenTable:
    def __init__(self, entries: list[tuple[str, str]]) -> None:
        self._entries = [(ident, _digest(token)) for ident, token in entries]

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def from_file(cls, path: Path) -> "TokenTable":
        try:
            refuse_public(path)
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read token file ({exc.strerror})") from None
        entries: list[tuple[str, str]] = []
        owners: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or len(parts[1]) < MIN_TOKEN_LEN:
                raise ConfigError(f"{path}:{number}: expected 'ID TOKEN' with a token of at least {MIN_TOKEN_LEN} characters")
            if owners.setdefault(parts[1], parts[0]) != parts[0]:
                raise ConfigError(f"{path}:{number}: this token is already {owners[parts[1]]}'s: one token, one id")
            entries.append((parts[0], parts[1]))
        return cls(entries)

    def identify(self, presented: str) -> str | None:
        """The id whose token equals `presented`, or None."""
        candidate = _digest(presented)
        found = None
        for ident, token in self._entries:
            if hmac.compare_digest(candidate, token) and found is None:
                found = ident
        return found


def read_own_token(path: Path) -> str:
    """A daemon's own token (the whole file, stripped), for the Authorization header."""
    try:
        refuse_public(path)
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


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def refuse_public(path: Path, what: str = "token file") -> None:
    """ConfigError if every user on the machine may read or write the token file (or another secret: `what`)."""
    st = os.stat(path)  # OSError: reported by the caller as "cannot read"
    if st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigError(f"{path}: {what} is readable or writable by every user "
                          f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it (or 640 with the daemon's group)")


def check_private(path: Path) -> str | None:
    """A warning if a token file's group, other than the daemon's own, may read or write it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if st.st_mode & (stat.S_IRGRP | stat.S_IWGRP) and st.st_gid != os.getegid():
        return f"{path} is readable by group {st.st_gid}, not only by this daemon; chmod 600 it"
    return None
