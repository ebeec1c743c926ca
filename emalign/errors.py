"""User-facing errors: bad input gets one clear line naming the file, line or key, not a traceback."""

from __future__ import annotations

import errno
import math
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
                         f"({free:.1f} MiB free in {directory}); free some space there, or write to another disk")


def filesystem_error(err: OSError) -> UserError:
    """One line naming the path of a failed file operation (a full disk says how much space is left)."""
    if err.errno in NO_SPACE:
        return no_space(err.filename)
    where = f"{err.filename} -> {err.filename2}" if err.filename2 else str(err.filename)
    return UserError(f"{where}: {err.strerror or err}")


@contextmanager
def friendly_errors(interrupted: Optional[str] = None) -> Iterator[None]:
    """Turn ``UserError`` and a file operation that failed on a named path into ``error: message`` on
    stderr and exit code 2; with ``interrupted`` (the line to print: say there how to resume), Ctrl+C
    too, with exit code 130. ``EMALIGN_TRACEBACK=1`` keeps the trace."""
    try:
        try:
            yield
        except OSError as err:
            if err.filename is None and err.errno not in NO_SPACE:
                raise
            raise filesystem_error(err) from err
    except UserError as err:
        if os.environ.get("EMALIGN_TRACEBACK"):
            raise
        print(f"error: {as_typed(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if interrupted is None or os.environ.get("EMALIGN_TRACEBACK"):
            raise
        print(interrupted, file=sys.stderr)
        raise SystemExit(130) from None


class SettingError(UserError):
    """A numeric setting outside its allowed range; the message names the key and the range."""

    def __init__(self, message: str, key: Optional[str] = None, value=None) -> None:
        super().__init__(message)
        self.key, self.value = key, value


TYPED: dict[str, list] = {"flags": [], "config": []}
"""What the user typed, as the entry (``cli.py``) parsed it: the command line's ``--flags`` and the config's
(dotted key, value) pairs. It lets a setting's error name the key the way the user wrote it, whichever class
checked it (the class knows its field, not where in a config it sits)."""


def as_typed(err: UserError) -> str:
    """``err``'s message, a :class:`SettingError`'s key replaced by the flag the user typed (``--conscience.
    every_n_steps``) or else the config key holding that value, as YAML writes it (``model.preference_loss.beta``)."""
    if not isinstance(err, SettingError) or not err.key:
        return str(err)
    name = err.key.lstrip("-").rpartition(".")[2]
    flags = {f for f in TYPED["flags"] if f.lstrip("-").rpartition(".")[2] == name}
    same = lambda v: v == err.value or (isinstance(v, float) and isinstance(err.value, float)  # noqa: E731
                                        and math.isnan(v) and math.isnan(err.value))
    keys = {k for k, v in TYPED["config"] if k.rpartition(".")[2] == name and same(v)}
    typed = next(iter(flags)) if len(flags) == 1 else next(iter(keys)) if len(keys) == 1 else None
    return str(err).replace(err.key, typed, 1) if typed else str(err)


def check_range(key: str, value, low=None, high=None, *, low_open: bool = False, high_open: bool = False,
                none_ok: bool = False) -> None:
    """Raise :class:`SettingError` unless ``low <= value <= high`` (open ends where asked); NaN and ±inf never
    pass: no setting means "unbounded" by infinity (``none_ok`` and None say that).

    ``key`` is what the user typed (``model.pairs_per_step``, ``--temperature``), so the one-line error
    can be acted on: ``model.pairs_per_step: must be >= 0, got -1``.
    """
    if value is None and none_ok:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = f"{'>' if low_open else '>='} {low}" if low is not None else ""
        hi = f"{'<' if high_open else '<='} {high}" if high is not None else ""
        allowed = " and ".join(filter(None, [lo, hi])) or "a number"
        raise SettingError(f"{key}: must be {allowed}{' (or null)' if none_ok else ''}, got {value!r}", key, value)
