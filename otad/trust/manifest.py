"""manifest.json and the `.sha256` checksum file: the release record, parsed strictly.

The one manifest reader of the project: the dashboard, the gateway, the robot
and `otad-release` all call `parse_manifest`. Unknown fields are ignored so
that newer writers can add fields; a missing or ill-typed required field is a
`MalformedMetadata` naming the field. See docs/formats.md.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from otad.errors import MalformedMetadata
from otad.semver import Version

SCHEMA = 1
MAX_MANIFEST_BYTES = 64 * 1024
MAX_CHECKSUM_BYTES = 4096
SIGNATURE_KINDS = ("cosign", "gpg")
# Release names and file names become paths on gateways and robots: keep them
# to one safe path component.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z")
_CHECKSUM_LINE = re.compile(r"([0-9a-f]{64}) [ *](\S+)\n?")


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    artifact: str
    size: int
    sha256: str
    bundle: str
    checksum: str
    signature: str
    created: str
    expires: str  # after this instant (RFC 3339 UTC) the manifest is refused: freeze attacks
    allow_downgrade: bool = False  # the signer authorises robots to go down to this version

    @property
    def files(self) -> tuple[str, str, str]:
        """The files a release consists of, besides the manifest itself."""
        return (self.artifact, self.bundle, self.checksum)

    @property
    def parsed_version(self) -> Version:
        return Version(self.version)

    @property
    def expires_epoch(self) -> float:
        return _parse_timestamp(self.expires).timestamp()

    @property
    def created_epoch(self) -> float:
        return timestamp_epoch(self.created)


def parse_manifest(data: bytes) -> Manifest:
    if len(data) > MAX_MANIFEST_BYTES:
        raise MalformedMetadata(f"manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[... (fuzzing)
        raise MalformedMetadata("manifest is not valid JSON") from None
    if not isinstance(doc, dict):
        raise MalformedMetadata("manifest is not a JSON object")
    schema = _field(doc, "schema", int)
    if schema != SCHEMA:
        raise MalformedMetadata(f"manifest schema {schema} is not supported (expected {SCHEMA})")
    manifest = Manifest(
        name=_matching(doc, "name", _NAME),
        version=_field(doc, "version", str),
        artifact=_file_name(doc, "artifact"),
        size=_field(doc, "size", int),
        sha256=_matching(doc, "sha256", _SHA256_HEX),
        bundle=_file_name(doc, "bundle"),
        checksum=_file_name(doc, "checksum"),
        signature=_field(doc, "signature", str),
        created=_matching(doc, "created", _RFC3339_UTC),
        expires=_matching(doc, "expires", _RFC3339_UTC),
        allow_downgrade=_optional_bool(doc, "allow_downgrade"),
    )
    Version(manifest.version)
    if manifest.size < 0:
        raise MalformedMetadata("manifest field 'size' is negative")
    if manifest.signature not in SIGNATURE_KINDS:
        raise MalformedMetadata(f"manifest field 'signature' must be one of {', '.join(SIGNATURE_KINDS)}")
    if len(set(manifest.files)) != 3 or "manifest.json" in manifest.files:
        raise MalformedMetadata("manifest names the same file twice")
    _parse_timestamp(manifest.created)
    _parse_timestamp(manifest.expires)
    return manifest


def render_manifest(manifest: Manifest) -> bytes:
    doc = {"schema": SCHEMA, **asdict(manifest)}
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("ascii")


def _field(doc: dict, key: str, kind: type):
    if key not in doc:
        raise MalformedMetadata(f"manifest lacks required field '{key}'")
    value = doc[key]
    # bool is an int subclass in Python; JSON true is never a size or schema.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise MalformedMetadata(f"manifest field '{key}' must be of type {kind.__name__}")
    return value


def _optional_bool(doc: dict, key: str) -> bool:
    value = doc.get(key, False)
    if not isinstance(value, bool):
        raise MalformedMetadata(f"manifest field '{key}' must be true or false")
    return value


def _matching(doc: dict, key: str, pattern: re.Pattern[str]) -> str:
    value = _field(doc, key, str)
    if not pattern.fullmatch(value):
        raise MalformedMetadata(f"manifest field '{key}' has an invalid value {value[:80]!r}")
    return value


def _file_name(doc: dict, key: str) -> str:
    value = _matching(doc, key, _FILE_NAME)
    if ".." in value:
        raise MalformedMetadata(f"manifest field '{key}' has an invalid value {value[:80]!r}")
    return value


def _parse_timestamp(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise MalformedMetadata(f"manifest timestamp {text!r} is not a valid date") from None


def timestamp_epoch(text: str) -> float:
    """An RFC 3339 UTC timestamp as the manifest writes it, in epoch seconds."""
    if not _RFC3339_UTC.fullmatch(text):
        raise MalformedMetadata(f"timestamp {text[:40]!r} is not RFC 3339 UTC")
    return _parse_timestamp(text).timestamp()


def utc_timestamp(epoch: float) -> str:
    """RFC 3339 UTC with second precision, as the manifest's `created` field."""
    return datetime.fromtimestamp(int(epoch), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_checksum_file(data: bytes) -> tuple[str, str]:
    """Return (sha256 hex, file name) from one `sha256sum` output line."""
    if len(data) > MAX_CHECKSUM_BYTES:
        raise MalformedMetadata("checksum file is too large")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedMetadata("checksum file is not ASCII") from None
    match = _CHECKSUM_LINE.fullmatch(text)
    if match is None:
        raise MalformedMetadata("checksum file is not one 'sha256sum' line")
    return match[1], match[2]


def render_checksum_file(sha256_hex: str, file_name: str) -> bytes:
    return f"{sha256_hex}  {file_name}\n".encode("ascii")
