"""Which file a URL path may name: one safe component inside one folder, nothing else."""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from urllib.parse import unquote

# The same shape manifest.py allows for artifact names, plus manifest.json itself.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}")


def safe_file_name(url_tail: str) -> str | None:
    """The file name a request names, or None if it could name anything else.

    Decoding happens once here; a name that still contains '%', a slash, a
    backslash, '..', or starts with a dot is refused, whatever its encoding.
    """
    if len(url_tail) > 1024:
        return None
    try:
        name = unquote(url_tail, errors="strict") if "%" in url_tail else url_tail
    except UnicodeDecodeError:
        return None
    if not _SAFE_NAME.fullmatch(name) or ".." in name:
        return None
    return name


def open_inside(root: Path, name: str):
    """Open root/name for reading if it is a regular file that really lives in root.

    Returns (file object, os.stat_result) or None. A symlink is followed only if
    its target stays inside root.
    """
    candidate = root / name
    try:
        real = Path(os.path.realpath(candidate))
        if real.parent != Path(os.path.realpath(root)):
            return None
        # O_NONBLOCK: opening a FIFO that sits where a file should be must not hang a thread.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb"), st
