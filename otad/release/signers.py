"""The two ways a release is signed: a cosign key (default) or a GnuPG key."""
from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from otad.trust import gpg
from otad.trust.bundle import render_bundle, render_legacy_bundle
from otad.trust.digest import FileDigest
from otad.trust.keys import public_key_hint
from otad.trust.signing import sign_digest


@dataclass(frozen=True)
class CosignSigner:
    key: ec.EllipticCurvePrivateKey
    legacy: bool = False
    kind: str = "cosign"
    suffix: str = ".bundle"

    def sign(self, path: str | os.PathLike[str], digest: FileDigest) -> bytes:
        signature = sign_digest(self.key, digest.sha256)
        if self.legacy:
            return render_legacy_bundle(signature)
        return render_bundle(signature, digest.sha256, public_key_hint(self.key.public_key()))


@dataclass(frozen=True)
class GpgSigner:
    home: str
    key_id: str
    passphrase: str | None = None
    kind: str = "gpg"
    suffix: str = ".asc"

    def sign(self, path: str | os.PathLike[str], digest: FileDigest) -> bytes:
        return gpg.sign_detached(self.home, self.key_id, path, self.passphrase)


Signer = CosignSigner | GpgSigner
