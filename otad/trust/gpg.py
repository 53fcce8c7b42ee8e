"""GnuPG as the second signature backend, through python-gnupg and the real `gpg`.

Verification imports the operator's trusted public keys into a throwaway
GnuPG home, so nothing outside the given keyring can vouch for a release and
the user's own ~/.gnupg is never read or written.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

import gnupg

# python-gnupg logs gpg's exit codes on its own, in its own words; every failure is
# already raised here with gpg's reason, which the caller logs once.
logging.getLogger("gnupg").setLevel(logging.CRITICAL)

from otad.errors import BadSignature, KeyFileError, MalformedMetadata, UntrustedKey

MAX_SIGNATURE_BYTES = 64 * 1024
ARMOR_HEADER = b"-----BEGIN PGP SIGNATURE-----"


def _gpg(home: str, autostart: bool = True) -> gnupg.GPG:
    if not os.path.isdir(home):
        raise KeyFileError(f"gpg home {home} does not exist or is not a folder")
    try:
        gpg = gnupg.GPG(gnupghome=home)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot run gpg: {exc}") from None
    if not autostart and gpg.version and gpg.version >= (2, 1):
        # Verifying needs no agent; without this `gpg --import` starts a
        # gpg-agent daemon for every throwaway home.
        gpg.options = [*(gpg.options or []), "--no-autostart"]
    return gpg


def _reason(result) -> str:
    """The last message gpg printed, as one line (stderr also carries status lines)."""
    lines = (line.strip() for line in (result.stderr or "").splitlines())
    messages = [line[len("gpg: "):] for line in lines if line.startswith("gpg: ")]
    return " ".join((messages[-1] if messages else result.status or "no reason given").split())


def _secret_key(gpg: gnupg.GPG, home: str, key_id: str) -> str:
    """The fingerprint of the one secret key `key_id` names in `home`."""
    keys = gpg.list_keys(secret=True, keys=[key_id]) if key_id.strip() else []
    if not keys:
        raise KeyFileError(f"gpg home {home} holds no secret key {key_id!r}")
    if len(keys) > 1:
        raise KeyFileError(f"{key_id!r} names {len(keys)} secret keys in gpg home {home}; give a fingerprint")
    return keys[0]["fingerprint"]


def sign_detached(gpg_home: str, key_id: str, path: str | os.PathLike[str], passphrase: str | None = None) -> bytes:
    """An ASCII-armored detached signature of the file at `path`."""
    if passphrase and ("\n" in passphrase or "\r" in passphrase):
        raise KeyFileError("the gpg passphrase must not contain a line break")
    gpg = _gpg(gpg_home)
    # --local-user, not python-gnupg's keyid (--default-key): gpg silently falls
    # back to another secret key when the --default-key one does not exist.
    extra = ["--local-user", _secret_key(gpg, gpg_home, key_id)]
    if passphrase is not None:
        extra += ["--pinentry-mode", "loopback"]
    with open(path, "rb") as stream:
        # An empty passphrase must not reach python-gnupg: it would still add
        # --passphrase-fd 0, and gpg would take the file's first line as the passphrase.
        result = gpg.sign_file(stream, detach=True, binary=False, passphrase=passphrase or None, extra_args=extra)
    if not result.data or not result.fingerprint:
        raise KeyFileError(f"gpg could not sign with key {key_id}: {_reason(result)}")
    return result.data


def _import(gpg: gnupg.GPG, keyring: bytes) -> list[str]:
    imported = gpg.import_keys(keyring)
    if not imported.fingerprints:
        raise KeyFileError("gpg keyring holds no public key")
    if getattr(imported, "sec_read", 0):  # read, whether or not gpg (without an agent) stored it
        raise KeyFileError("gpg keyring holds a secret key: give only public keys (gpg --export)")
    return list(imported.fingerprints)


def keyring_fingerprints(keyring: bytes) -> list[str]:
    """The keys a keyring holds, imported into a throwaway home: a daemon checks its
    TRUSTED_GPG_KEYRING at start-up, not at the first gpg-signed release."""
    home = tempfile.mkdtemp(prefix="otad-gpg-")
    try:
        return _import(_gpg(home, autostart=False), keyring)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def verify_detached_bytes(keyring: bytes, signature: bytes, data: bytes) -> str:
    """verify_detached for bytes in memory (a manifest): they go to a throwaway file first."""
    folder = tempfile.mkdtemp(prefix="otad-gpg-data-")
    try:
        path = os.path.join(folder, "data")
        with open(path, "wb") as out:
            out.write(data)
        return verify_detached(keyring, signature, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def verify_detached(keyring: bytes, signature: bytes, path: str | os.PathLike[str]) -> str:
    """Return the fingerprint of the trusted key that made `signature` over the file."""
    if len(signature) > MAX_SIGNATURE_BYTES or not signature.lstrip().startswith(ARMOR_HEADER):
        raise MalformedMetadata("gpg signature is not an ASCII-armored detached signature")
    home = tempfile.mkdtemp(prefix="otad-gpg-")
    try:
        gpg = _gpg(home, autostart=False)
        _import(gpg, keyring)
        sig_path = os.path.join(home, "artifact.sig")
        with open(sig_path, "wb") as out:
            out.write(signature)
        with open(sig_path, "rb") as sig_stream:
            result = gpg.verify_file(sig_stream, data_filename=os.fspath(path))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if result.valid:
        # The primary key's fingerprint (the one operators know), also for a signing subkey.
        return result.pubkey_fingerprint or result.fingerprint
    if result.status == "no public key":
        raise UntrustedKey(f"gpg signature made by unknown key {result.key_id}")
    raise BadSignature(f"gpg signature does not verify ({result.status or 'no valid signature'})")
