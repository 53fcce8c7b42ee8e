"""One strict JSON reader for documents whose readers must agree on every value.

Duplicate keys (two readers could each take a different one) and NaN/Infinity (not
JSON) are refused, each with a one-line reason, as `error(reason)`: the caller's own
bad-input exception, so a plan and an admin body each say which document was wrong.
"""
from __future__ import annotations

import json
from typing import Any, Callable


def loads_strict(data: bytes, error: Callable[[str], Exception], what: str) -> Any:
    """`data` as JSON, or raise `error("<what> ...")`; never another exception."""
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
        doc = dict(pairs)
        if len(doc) != len(pairs):
            raise refuse(f"{what} has a duplicate key (readers would disagree on its value)")
        return doc

    def no_constant(name: str) -> Any:
        raise refuse(f"{what} holds {name}, which is not JSON")

    refusals: list[Exception] = []

    def refuse(reason: str) -> Exception:
        refusals.append(error(reason))
        return refusals[-1]

    try:
        return json.loads(data, object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        if refusals:  # our own refusal, which may itself be a ValueError
            raise refusals[-1] from None
        raise error(f"{what} is not valid JSON") from None


def check_depth(data: bytes, max_depth: int, error: Callable[[str], Exception], what: str) -> None:
    """Refuse nesting deeper than `max_depth` before json.loads recurses into it (strings
    skipped, escapes honoured), as `error("<what> nests deeper than N levels")`."""
    depth, in_string, escaped = 0, False, False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > max_depth:
                raise error(f"{what} nests deeper than {max_depth} levels")
        elif byte in (0x5D, 0x7D):
            depth -= 1
