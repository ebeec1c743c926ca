"""User-facing errors: bad input gets one clear line naming the file, line or key, not a traceback."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator


class UserError(ValueError):
    """Bad input from the user (a file, a config value, a path); the message says which and why."""


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn ``UserError`` into ``error: message`` on stderr and exit code 2 (``EMALIGN_TRACEBACK=1`` keeps the trace)."""
    try:
        yield
    except UserError as err:
        if os.environ.get("EMALIGN_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
