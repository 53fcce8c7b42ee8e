"""The error families every otad component raises and catches.

Two families matter to callers (the python-tuf split): `TrustError` means the
content itself cannot be trusted, so retrying the same bytes is pointless;
`TransportError` means the bytes never arrived whole, so a retry may succeed.
Everything else an operator can fix (a config value, a key file) is its own class.
Every message is one line, fit for a log or a CLI's stderr.
"""


class OtadError(Exception):
    """Base of every expected, user-facing error."""


class ConfigError(OtadError):
    """A configuration file or value is missing or invalid."""


class KeyFileError(OtadError):
    """A key file cannot be read, decrypted or used."""


class ReleaseError(OtadError):
    """A release cannot be built or published from the given inputs."""


class TrustError(OtadError):
    """Content failed verification; it must not be cached, served or installed."""


class MalformedMetadata(TrustError):
    """A manifest, bundle or checksum file is not well formed."""


class ChecksumMismatch(TrustError):
    """An artifact's size or sha256 differs from what the signed metadata says."""


class BadSignature(TrustError):
    """A signature does not verify under any trusted key."""


class UntrustedKey(TrustError):
    """The content was signed by, or carries, a key the operator did not trust."""


class TransportError(OtadError):
    """A transfer failed or was cut; retrying later may succeed."""
