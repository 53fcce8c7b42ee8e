"""The one configuration reader: `KEY=VALUE` files plus environment overrides -> typed settings.

Rules shared by every daemon, the dashboard and `otadctl`:
- one `KEY=VALUE` per line; blank lines and lines starting with `#` are ignored;
  a value may be wrapped in matching single or double quotes;
- an environment variable with the same name as a key overrides the file;
- `--config PATH` selects another file; a missing default file is not an error
  (every key then comes from defaults and the environment), a missing named file is;
- a key the program does not know, in the file, is an error (a typo must not be
  silently ignored); a bad value is an error naming the key.

Each program declares its settings as a frozen dataclass whose fields carry a
parser in their metadata (`setting(...)`); `load_settings` fills it in.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from otad.errors import ConfigError

MAX_CONFIG_BYTES = 256 * 1024
_KEY = re.compile(r"[A-Z][A-Z0-9_]*")
T = TypeVar("T")


def setting(parse: Callable[[str], Any], default: str | None = None, doc: str = "") -> Any:
    """Declare a settings field: `parse` turns the raw text into the typed value.

    `default` is raw text (parsed like a file value); None means required.
    """
    meta = {"parse": parse, "raw_default": default, "doc": doc}
    if default is None:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=None, metadata=meta)


def read_config_file(path: str | os.PathLike[str], required: bool) -> dict[str, tuple[str, int]]:
    """Return {KEY: (raw value, line number)} from a KEY=VALUE file."""
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{path}: config file does not exist") from None
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config file is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config file is not UTF-8") from None
    values: dict[str, tuple[str, int]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, sep, value = stripped.partition("=")
        key = key.strip()
        if not sep or not _KEY.fullmatch(key):
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE, found {stripped[:60]!r}")
        values[key] = (_unquote(value.strip()), number)
    return values


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def load_settings(
    cls: type[T], path: str | os.PathLike[str], required: bool, environ: Mapping[str, str] | None = None
) -> T:
    """Build `cls` from the file at `path` and the environment."""
    environ = os.environ if environ is None else environ
    from_file = read_config_file(path, required)
    fields = {f.name.upper(): f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key, (_, number) in from_file.items():
        if key not in fields:
            raise ConfigError(f"{path}:{number}: unknown key {key}")
    values: dict[str, Any] = {}
    for key, field in fields.items():
        if key in environ:
            raw, origin = environ[key], f"{key} (environment)"
        elif key in from_file:
            raw, origin = from_file[key][0], f"{key} ({path}:{from_file[key][1]})"
        elif field.metadata["raw_default"] is not None:
            raw, origin = field.metadata["raw_default"], f"{key} (default)"
        else:
            raise ConfigError(f"{key} is required: set it in {path} or the environment")
        try:
            values[field.name] = field.metadata["parse"](raw)
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"{origin}: {exc}") from None
    settings = cls(**values)
    check = getattr(settings, "check", None)
    if check is not None:
        check()
    return settings


# Parsers: each takes the raw text and returns the typed value or raises ValueError.


def text(raw: str) -> str:
    return raw


def seconds(raw: str) -> int:
    """A whole number of seconds, at least 1."""
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{raw!r} is not a whole number of seconds >= 1")
    return int(raw)


def whole(minimum: int = 0, maximum: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        if not raw.isdigit() or int(raw) < minimum or (maximum is not None and int(raw) > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"{raw!r} is not a whole number {bound}")
        return int(raw)

    return parse


def boolean(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"{raw!r} is not yes/no")


def http_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{raw!r} is not an http:// or https:// URL")
    return raw.rstrip("/")


def listen_address(raw: str) -> tuple[str, int]:
    """`HOST:PORT`, or `[v6addr]:PORT`; port 0 asks the kernel for a free one."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^\s:\[\]]+):(\d{1,5})", raw.strip())
    if match is None:
        raise ValueError(f"{raw!r} is not HOST:PORT (use [::1]:PORT for IPv6)")
    host = match[1] or match[3]
    port = int(match[2] or match[4])
    if port > 65535:
        raise ValueError(f"port {port} is out of range")
    return host, port


def path(raw: str) -> Path:
    if not raw:
        raise ValueError("path is empty")
    return Path(raw)


def optional_path(raw: str) -> Path | None:
    return Path(raw) if raw else None


def path_list(raw: str) -> tuple[Path, ...]:
    """Paths separated by spaces or commas."""
    items = [p for p in re.split(r"[\s,]+", raw.strip()) if p]
    if not items:
        raise ValueError("no path given")
    return tuple(Path(p) for p in items)


def identifier(raw: str) -> str:
    """A name that appears in logs, URLs and database keys: robot and gateway ids."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", raw):
        raise ValueError(f"{raw[:70]!r} is not an id (letters, digits, . _ -, up to 64)")
    return raw
