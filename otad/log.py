"""Logging for daemons: one line per event on stderr, no timestamps (journald adds them).

Under journald (JOURNAL_STREAM set) each line gets a `<N>` syslog priority
prefix, so `journalctl -p warning` finds rejections and rollbacks.
"""
from __future__ import annotations

import logging
import os
import sys

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _Formatter(logging.Formatter):
    def __init__(self, prefix_priority: bool) -> None:
        super().__init__("%(message)s")
        self._prefix = prefix_priority

    def format(self, record: logging.LogRecord) -> str:
        # One event, one line: a multi-line message would be split by journald.
        message = " ".join(super().format(record).split("\n"))
        if self._prefix:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{message}"
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return level + message


def setup_logging(debug: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(prefix_priority="JOURNAL_STREAM" in os.environ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # Connection-pool chatter from urllib3 is not an event an operator acts on.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
