"""The dashboard (central server): serves published releases to gateways.

`application` is a WSGI callable for any WSGI server (gunicorn, uwsgi,
mod_wsgi, waitress-serve): it reads its settings from the file named by
$OTAD_DASHBOARD_CONFIG, else /etc/otad/dashboard.conf, on the first request.
`otad-dashboard` (otad.dashboard.main) serves the same app with waitress.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from otad.config import load_settings
from otad.dashboard.app import DashboardApp, Environ, StartResponse, Telemetry, error_response
from otad.dashboard.ota import OtaFolder
from otad.dashboard.settings import CONFIG_ENV, DEFAULT_CONFIG, DashboardSettings
from otad.dashboard.store import SqliteTelemetryStore
from otad.dashboard.rollouts import RolloutDesk
from otad.telemetry.tokens import TokenTable, refuse_public
from otad.errors import ConfigError, KeyFileError, OtadError
from otad.trust.keys import load_private_key

__all__ = ["application", "make_app", "DashboardApp", "DashboardSettings"]
log = logging.getLogger("otad.dashboard")
KEY_PASSWORD_ENV = "OTAD_ROLLOUT_KEY_PASSWORD"


def make_app(settings: DashboardSettings, use_inotify: bool = True) -> DashboardApp:
    """The dashboard's WSGI app for `settings` (creates OTA_DIR if it is missing)."""
    store = SqliteTelemetryStore(settings.telemetry_path)
    tokens = TokenTable.from_file(settings.tokens_file) if settings.tokens_file else None
    operators = TokenTable.from_file(settings.operator_tokens_file) if settings.operator_tokens_file else None
    ota = OtaFolder(settings.ota_dir, use_inotify=use_inotify)
    desk = RolloutDesk(store, load_rollout_key(settings.rollout_key), ota, operators)
    return DashboardApp(ota, Telemetry(store, tokens), desk)


def load_rollout_key(path: Path | None) -> ec.EllipticCurvePrivateKey | None:
    """ROLLOUT_KEY: a private key from `otad-release keygen`, refused if every user may read it.
    Its password comes from $OTAD_ROLLOUT_KEY_PASSWORD (empty if unset)."""
    if path is None:
        return None
    try:
        refuse_public(path, "rollout key")
        pem = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"ROLLOUT_KEY {path}: cannot read ({exc.strerror})") from None
    password = os.environ.get(KEY_PASSWORD_ENV, "").encode("utf-8")
    try:
        return load_private_key(pem, password, str(path))
    except KeyFileError as exc:
        raise ConfigError(f"ROLLOUT_KEY: {exc}") from None


class _LazyApplication:
    """Loads settings on the first request, so importing the module has no side effects
    and a pre-forking server builds one app (and one inotify watch) per worker."""

    def __init__(self) -> None:
        self._app: DashboardApp | None = None
        self._lock = threading.Lock()

    def _load(self) -> DashboardApp:
        with self._lock:
            if self._app is None:
                path = os.environ.get(CONFIG_ENV, DEFAULT_CONFIG)
                settings = load_settings(DashboardSettings, path, required=CONFIG_ENV in os.environ)
                self._app = make_app(settings)
            return self._app

    def close(self) -> None:
        """Stop watching OTA_DIR (for a server's shutdown hook); the next request loads again."""
        with self._lock:
            app, self._app = self._app, None
        if app is not None:
            app.ota.close()

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        app = self._app
        if app is None:
            try:
                app = self._load()
            except Exception as exc:
                # Not cached: the next request tries again once the config is fixed.
                reason = str(exc) if isinstance(exc, OtadError) else f"{type(exc).__name__}: {exc}"
                log.error("dashboard not configured: %s", reason)
                return error_response(start_response, 500, "dashboard is not configured", environ.get("REQUEST_METHOD", "GET"))
        return app(environ, start_response)


application: Any = _LazyApplication()
