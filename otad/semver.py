"""Release version strings: MAJOR.MINOR.PATCH with an optional -suffix.

Ordering follows Semantic Versioning 2.0 precedence: a pre-release
(1.2.0-rc1) sorts before its release (1.2.0); numeric suffix parts compare
as numbers, others as ASCII. Build metadata (+...) is not allowed in release
versions, because two artifacts that differ must never share an order, and
neither are leading zeros (1.0.0-01): so two versions are equal exactly when
their texts are, and `same_version`/`version_in` compare versions as versions
wherever a text might not have been parsed here.
"""
from __future__ import annotations

import re
from functools import total_ordering

from otad.errors import MalformedMetadata

# A pre-release identifier: a number without leading zeros, or alphanumerics with a letter.
# "01" is refused (SemVer 9): it would be the same version as "1" under another spelling,
# and blacklists, file names and the cache key versions by their text.
_IDENTIFIER = r"(?:0|[1-9]\d*|\d*[A-Za-z][0-9A-Za-z]*)"
# re.ASCII: `\d` alone also matches other scripts' digits, and int() reads them, so
# "1\u0661.0.0" was the same version as "11.0.0" under another text (and a file or URL name).
_VERSION = re.compile(
    r"(0|[1-9]\d{0,8})\.(0|[1-9]\d{0,8})\.(0|[1-9]\d{0,8})"
    rf"(?:-({_IDENTIFIER}(?:\.{_IDENTIFIER})*))?",
    re.ASCII,
)
MAX_VERSION_LEN = 64


@total_ordering
class Version:
    __slots__ = ("text", "_core", "_pre")

    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or len(text) > MAX_VERSION_LEN:
            raise MalformedMetadata(f"version {text!r} is not MAJOR.MINOR.PATCH[-suffix]")
        match = _VERSION.fullmatch(text)
        if match is None:
            raise MalformedMetadata(f"version {text!r} is not MAJOR.MINOR.PATCH[-suffix]")
        self.text = text
        self._core = (int(match[1]), int(match[2]), int(match[3]))
        self._pre = tuple(_pre_key(p) for p in match[4].split(".")) if match[4] else None

    def _key(self) -> tuple:
        # A release (no suffix) sorts after every pre-release of the same core.
        return (self._core, (1,) if self._pre is None else (0, self._pre))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Version) and self._key() == other._key()

    def __lt__(self, other: "Version") -> bool:
        return self._key() < other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Version({self.text!r})"


def _pre_key(part: str) -> tuple[int, int | str]:
    # Numeric identifiers sort before alphanumeric ones (SemVer rule 11.4.3).
    return (0, int(part)) if part.isdigit() else (1, part)


def parse_version(text: str) -> Version:
    return Version(text)


def same_version(a: str | None, b: str | None) -> bool:
    """a and b name the same version (False if either is missing or not a version)."""
    if a is None or b is None:
        return False
    try:
        return Version(a) == Version(b)
    except MalformedMetadata:
        return False


def version_in(candidate: str, versions) -> bool:
    """candidate is one of `versions` (a blacklist), compared as versions."""
    return any(same_version(candidate, v) for v in versions)
