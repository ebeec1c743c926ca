"""User-facing errors: bad input gets one clear line naming the file, line or key, not a traceback."""

from __future__ import annotations

import errno
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
"""errno values of a full disk or an exhausted quota."""


class UserError(ValueError):
    """Bad input from the user (a file, a config value, a path); the message says which and why."""


class DiskFullError(UserError):
    """A write that ran out of disk space (or quota); the message names the file and its free space."""


def no_space(path: Optional[str | os.PathLike], what: str = "") -> DiskFullError:
    """The one-line error for a write to ``path`` that found the disk full."""
    where = Path(path) if path else None
    directory = where.parent if where else Path.cwd()
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    free = shutil.disk_usage(directory).free / 2**20
    return DiskFullError(f"no space left on the device writing {what + ' ' if what else ''}{where or '(unknown file)'} "
                         f"({free:.1f} MiB free in {directory}); free some space or write the run elsewhere "
                         "(--trainer.default_root_dir)")


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn ``UserError`` (and a full disk) into ``error: message`` on stderr and exit code 2
    (``EMALIGN_TRACEBACK=1`` keeps the trace)."""
    try:
        try:
            yield
        except OSError as err:
            if err.errno not in NO_SPACE:
                raise
            raise no_space(err.filename) from err
    except UserError as err:
        if os.environ.get("EMALIGN_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
