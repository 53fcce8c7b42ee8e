"""Config parsers for trust material, shared by the gateway and the robot."""
from __future__ import annotations

from otad.config import path_list
from otad.errors import KeyFileError
from otad.trust.keys import PublicKey, load_public_key_files


def trusted_keys(raw: str) -> tuple[PublicKey, ...]:
    """TRUSTED_KEYS: cosign public key files, or folders of `*.pub`, separated by spaces or commas."""
    paths = path_list(raw)
    try:
        keys = load_public_key_files([str(p) for p in paths])
    except KeyFileError as exc:
        raise ValueError(str(exc)) from None
    if not keys:
        raise ValueError(f"no *.pub key found in {raw}")
    return tuple(keys)
