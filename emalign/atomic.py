"""Atomic file writes: a reader (or a crash) never sees a half-written file.

The text goes to a temp file in the target's directory, is flushed and fsynced, then renamed over
the target (``os.replace`` is atomic within one file system).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomic(path: Path | str, text: str) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; these are ordinary shared files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def writable_dir(path: Path | str, key: str = "--out") -> Path:
    """Create ``path`` and check that files can be written in it, before any expensive work.

    Raises a one-line ``UserError`` naming ``key`` and the path when it is a file or cannot be written.
    """
    from emalign.errors import UserError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{key} {path}: is a file, expected a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"{key} {path}: cannot write there ({err.strerror or err})") from None
    return path
