"""Config parsers for trust material, shared by the gateway and the robot."""
from __future__ import annotations

from otad.config import optional_path, path_list
from otad.errors import ConfigError, KeyFileError
from otad.trust.keys import PublicKey, load_public_key_files

MAX_KEYRING_BYTES = 1024 * 1024


def trusted_keys(raw: str) -> tuple[PublicKey, ...]:
    """TRUSTED_KEYS: cosign public key files, or folders of `*.pub`, separated by spaces or commas.

    Empty: no cosign key (only sensible with TRUSTED_GPG_KEYRING; see check_trust)."""
    if not raw.strip():
        return ()
    paths = path_list(raw)
    try:
        keys = load_public_key_files([str(p) for p in paths])
    except KeyFileError as exc:
        raise ValueError(str(exc)) from None
    if not keys:
        raise ValueError(f"no *.pub key found in {raw}")
    return tuple(keys)


def trusted_gpg_keyring(raw: str) -> bytes | None:
    """TRUSTED_GPG_KEYRING: one file of exported GnuPG public keys (`gpg --export`, binary
    or `--armor`), for releases built with `otad-release build --gpg-key`; empty: none."""
    keyring_path = optional_path(raw)
    if keyring_path is None:
        return None
    try:
        with open(keyring_path, "rb") as stream:
            data = stream.read(MAX_KEYRING_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"{keyring_path}: cannot read gpg keyring ({exc.strerror})") from None
    if len(data) > MAX_KEYRING_BYTES:
        raise ValueError(f"{keyring_path}: gpg keyring is larger than {MAX_KEYRING_BYTES} bytes")
    from otad.trust import gpg  # python-gnupg and the gpg binary are needed only where gpg is configured

    try:
        gpg.keyring_fingerprints(data)
    except KeyFileError as exc:
        raise ValueError(f"{keyring_path}: {exc}") from None
    return data


def check_trust(keys: tuple[PublicKey, ...], keyring: bytes | None) -> None:
    """Something must be able to verify a release."""
    if not keys and keyring is None:
        raise ConfigError("TRUSTED_KEYS is empty and TRUSTED_GPG_KEYRING is not set: no release could ever verify")



def rollout_keys(raw: str, release_keys: tuple[PublicKey, ...] = ()) -> tuple[PublicKey, ...]:
    """ROLLOUT_KEYS: the rollout key's public key files (as TRUSTED_KEYS), which sign plans.

    Empty: no rollouts (newest release to all, as before issue 15). A key that is
    also in TRUSTED_KEYS is refused: the release key and the rollout key are
    separate roles (otad/rollout/signed.py)."""
    from otad.rollout.signed import check_key_split

    keys = trusted_keys(raw)
    check_key_split(release_keys, keys)
    return keys
