"""TLS for otad's links, built in one place from settings.

Clients (gateway -> dashboard, robot and agent -> gateway) get their requests
Session options from `ClientTls`: the server certificate is always checked,
against the configured CA file or else the system CA store, and a client
certificate is presented when one is configured (mutual TLS). The gateway's
edge listener gets its `ssl.SSLContext` from `server_context`. The dashboard
does not terminate TLS itself (waitress has no TLS): an nginx in front does,
see docs/security.md.

Plain http:// stays possible for a lab; every daemon logs `plain_http_warning`
once at start-up for such a URL or listener.
"""
from __future__ import annotations

import ipaddress
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from otad.errors import ConfigError

# Debian's (and most distributions') system bundle; requests from PyPI would use certifi's.
SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
_HOSTNAME_MISMATCH = re.compile(r"hostname '[^']{0,255}' doesn't match [^)\"]{0,300}")
_SSL_REASON = re.compile(r"certificate verify failed[^'\")]*|hostname [^'\")]*mismatch[^'\")]*")


def system_ca_bundle() -> str | bool:
    """The system CA store as requests' `verify`; True (requests' own default) if none is found."""
    default = ssl.get_default_verify_paths().cafile
    for candidate in (default, str(SYSTEM_CA_BUNDLE)):
        if candidate and os.path.isfile(candidate):
            return candidate
    return True


@dataclass(frozen=True)
class ClientTls:
    """How an HTTPS client of otad checks the server and identifies itself."""

    ca_file: Path | None = None  # None: the system CA store
    cert_file: Path | None = None  # client certificate (PEM) for mutual TLS
    key_file: Path | None = None  # its private key (PEM, unencrypted); None: inside cert_file

    def session_options(self) -> dict[str, Any]:
        """`verify` and `cert` keyword arguments for requests (2.28+, urllib3 1.26+). Pass them per
        request: on a Session, $REQUESTS_CA_BUNDLE would override `verify`."""
        options: dict[str, Any] = {"verify": str(self.ca_file) if self.ca_file else system_ca_bundle()}
        if self.cert_file is not None:
            options["cert"] = (str(self.cert_file), str(self.key_file)) if self.key_file else str(self.cert_file)
        return options


def client_tls(settings: Any, ca_setting: str) -> ClientTls:
    """ClientTls from a settings object with `<ca_setting>`, `client_cert` and `client_key`."""
    return ClientTls(getattr(settings, ca_setting), settings.client_cert, settings.client_key)


def check_client_files(ca_file: Path | None, cert_file: Path | None, key_file: Path | None,
                       ca_name: str) -> None:
    """ConfigError naming the setting if a CA, certificate or key file cannot be used."""
    context = ssl.create_default_context()
    if ca_file is not None:
        _load(lambda: context.load_verify_locations(cafile=str(ca_file)), ca_name, ca_file)
    if key_file is not None and cert_file is None:
        raise ConfigError("CLIENT_KEY is set but CLIENT_CERT is not")
    if cert_file is not None:
        _load(lambda: context.load_cert_chain(str(cert_file), str(key_file) if key_file else None),
              "CLIENT_CERT/CLIENT_KEY", cert_file)
        _check_private(key_file or cert_file, "CLIENT_KEY" if key_file else "CLIENT_CERT")


def server_context(cert_file: Path, key_file: Path | None, client_ca: Path | None) -> ssl.SSLContext:
    """The edge listener's TLS: TLS 1.2+, and client certificates required when `client_ca` is set."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(lambda: context.load_cert_chain(str(cert_file), str(key_file) if key_file else None), "TLS_CERT/TLS_KEY", cert_file)
    _check_private(key_file or cert_file, "TLS_KEY" if key_file else "TLS_CERT")
    if client_ca is not None:
        _load(lambda: context.load_verify_locations(cafile=str(client_ca)), "TLS_CLIENT_CA", client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _load(action, name: str, path: Path) -> None:
    try:
        action()
    except FileNotFoundError:
        raise ConfigError(f"{name} ({path}): file does not exist") from None
    except (OSError, ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"{name} ({path}): cannot be used ({str(reason)[:120]})") from None


def _check_private(path: Path, name: str) -> None:
    """A private key others can read is a key others have: refuse it, as ssh does."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & 0o004:
        raise ConfigError(f"{name} ({path}): private key is readable by other users; chmod 600 it")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def plain_http_warning(url: str, setting: str) -> str | None:
    """The start-up warning for a plain http:// URL (None for https://)."""
    if urlsplit(url).scheme != "http":
        return None
    return (f"{setting} {url} is plain HTTP: bearer tokens and telemetry cross the network unencrypted "
            "(releases are still verified by signature); use https:// outside a lab (docs/security.md)")


def describe_tls_error(exc: BaseException) -> str:
    """The useful part of a requests/urllib3 SSLError, e.g. 'certificate verify failed: ...'."""
    text = str(exc)
    # urllib3 1.26 checks the host name itself and says so in its own words.
    old_style = _HOSTNAME_MISMATCH.search(text)
    if old_style:
        return f"certificate verify failed: {old_style[0]}"[:160]
    start = text.find("[SSL")
    if start < 0:
        match = _SSL_REASON.search(text)
        return match[0].strip()[:160] if match else ""
    # The reason sits in a repr'd string: it ends at that string's own quote.
    quote = text[start - 1] if start and text[start - 1] in "'\"" else ""
    end = text.find(quote, start) if quote else -1
    reason = text[start:end if end > 0 else len(text)]
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", reason).strip()[:160]
