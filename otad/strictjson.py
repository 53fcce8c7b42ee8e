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
