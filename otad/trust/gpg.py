"""GnuPG as the second signature backend, through python-gnupg and the real `gpg`.

Verification imports the operator's trusted public keys into a throwaway
GnuPG home, so nothing outside the given keyring can vouch for a release and
the user's own ~/.gnupg is never read or written.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import gnupg

from otad.errors import BadSignature, KeyFileError, MalformedMetadata, UntrustedKey

MAX_SIGNATURE_BYTES = 64 * 1024
ARMOR_HEADER = b"-----BEGIN PGP SIGNATURE-----"


def _gpg(home: str) -> gnupg.GPG:
    try:
        return gnupg.GPG(gnupghome=home)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot run gpg: {exc}") from None


def sign_detached(gpg_home: str, key_id: str, path: str | os.PathLike[str], passphrase: str | None = None) -> bytes:
    """An ASCII-armored detached signature of the file at `path`."""
    gpg = _gpg(gpg_home)
    extra = ["--pinentry-mode", "loopback"] if passphrase is not None else None
    with open(path, "rb") as stream:
        result = gpg.sign_file(stream, keyid=key_id, detach=True, binary=False, passphrase=passphrase, extra_args=extra)
    if not result.data or not result.fingerprint:
        raise KeyFileError(f"gpg could not sign with key {key_id}: {result.status or result.stderr.strip()[-200:]}")
    return result.data


def verify_detached(keyring: bytes, signature: bytes, path: str | os.PathLike[str]) -> str:
    """Return the fingerprint of the trusted key that made `signature` over the file."""
    if len(signature) > MAX_SIGNATURE_BYTES or not signature.lstrip().startswith(ARMOR_HEADER):
        raise MalformedMetadata("gpg signature is not an ASCII-armored detached signature")
    home = tempfile.mkdtemp(prefix="otad-gpg-")
    try:
        gpg = _gpg(home)
        imported = gpg.import_keys(keyring)
        if not imported.fingerprints:
            raise KeyFileError("gpg keyring holds no public key")
        sig_path = os.path.join(home, "artifact.sig")
        with open(sig_path, "wb") as out:
            out.write(signature)
        with open(sig_path, "rb") as sig_stream:
            result = gpg.verify_file(sig_stream, data_filename=os.fspath(path))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if result.valid:
        return result.fingerprint
    if result.status == "no public key":
        raise UntrustedKey(f"gpg signature made by unknown key {result.key_id}")
    raise BadSignature(f"gpg signature does not verify ({result.status or 'no valid signature'})")
