"""Files a reader (or a crash) never sees half-written: atomic writes and resumable JSONL row files.

An atomic write puts the text in a temp file in the target's directory, flushes and fsyncs it, then
renames it over the target (``os.replace`` is atomic within one file system).

A row file (read by ``key``, appended row by row) survives a kill: each row is flushed and fsynced
before the next is made, and a reader cuts a truncated last line off the file so later appends start
on a fresh line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

log = logging.getLogger(__name__)


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """A full disk while writing ``path`` says so, naming ``path`` and its disk's free space (a write to an
    open file raises ENOSPC without a file name)."""
    from emalign.errors import NO_SPACE, no_space

    try:
        yield
    except OSError as err:
        if err.errno in NO_SPACE:
            raise no_space(path) from err
        raise


def write_text_atomic(path: Path | str, text: str) -> Path:
    path = Path(path)
    with _naming(path):
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


LOCK_FILE = ".emalign.lock"
_claims: dict[Path, Any] = {}


def first_process() -> bool:
    """False in the later ranks of a distributed job (torchrun, Lightning's launcher, SLURM): they write
    into the directory their first process claimed."""
    return all(os.environ.get(v, "0") in ("0", "") for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def claim_dir(path: Path | str, key: str = "--out") -> Path:
    """:func:`writable_dir`, then hold the directory for this process: one writer per run directory.

    An exclusive ``flock`` on ``PATH/.emalign.lock``, held until :func:`release_claims` or the process ends.
    The kernel drops it when its holder dies, however it dies, so a crash never leaves a directory held. A
    second writer gets a one-line ``UserError`` naming the holder, before any expensive work.
    """
    import fcntl

    from emalign.errors import UserError

    made = _missing_ancestors(Path(path))
    path = writable_dir(path, key)
    real = path.resolve()
    if not first_process() or real in _claims:
        return path
    handle = open(real / LOCK_FILE, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"{key} {path}: {holder} is writing there; wait for it to end or write elsewhere "
                        "(a process that dies lets go of the directory)") from None
    except OSError as err:  # a file system without locks (some NFS mounts): run, but say nothing guards it
        handle.close()
        log.warning("%s: cannot lock %s (%s); a second writer there would not be stopped", key, path, err)
        return path
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} ({' '.join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv[:3]))})")
    handle.flush()
    _claims[real] = handle, made
    return path


def _missing_ancestors(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first: what claiming it creates."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder.resolve())
    return missing


SETTINGS_RECORDS = {LOCK_FILE, "config.yaml", "hparams.yaml", "eval_config.json", "scores_config.json"}
"""Files that record how a run was asked for, not what it made: a directory holding only these holds no result."""


def discard_without_result(folder: Path, made: Sequence[Path] = ()) -> None:
    """Remove ``folder`` if it holds no result (only :data:`SETTINGS_RECORDS`, in any folders), then those of
    ``made`` (its parents, deepest first) that are left empty."""
    if not folder.is_dir() or not all(p.is_dir() or p.name in SETTINGS_RECORDS for p in folder.rglob("*")):
        return
    shutil.rmtree(folder, ignore_errors=True)
    for parent in made:
        try:
            parent.rmdir()
        except OSError:  # not empty: another run lives there
            break


def release_claims() -> None:
    """Let go of every directory this process claimed (a verb's end). A directory the claim created that
    holds no result goes too, with the parents the claim made: a run that failed before its first result
    leaves nothing behind, and loses nothing."""
    for real, (handle, made) in _claims.items():
        if made:
            discard_without_result(real, made[1:])
        handle.close()  # closing the descriptor drops its flock
    _claims.clear()


def jsonl_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of JSONL text, split on "\\n" alone. ``str.splitlines`` also splits on U+2028,
    U+0085, \\x1c and others, which ``json.dumps(..., ensure_ascii=False)`` leaves unescaped inside strings:
    a row holding one would read back as two broken halves."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return enumerate(lines, 1)


def read_rows(path: Path) -> dict[str, dict]:
    """Rows of a JSONL file by ``key``. A truncated last line (a kill mid-write) is cut off the
    file so that later appends start on a fresh line; other unreadable lines are skipped."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping a truncated last line (%d bytes)", path, len(data) - keep)
        with open(path, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    rows: dict[str, dict] = {}
    for number, line in jsonl_lines(data.decode("utf-8", errors="replace")):
        try:
            row = json.loads(line)
            rows[str(row["key"])] = row
        except (ValueError, KeyError, TypeError):
            if line.strip():
                log.warning("%s:%d: unreadable row skipped", path, number)
    return rows


class RowWriter:
    """Appends rows to a JSONL file, each flushed and fsynced before the next is made."""

    def __init__(self, path: Optional[Path]) -> None:
        self.path = path
        self.handle = open(path, "a", encoding="utf-8") if path else None

    def write(self, row: dict) -> None:
        if self.handle:
            with _naming(self.path):
                self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                self.handle.flush()
                os.fsync(self.handle.fileno())

    def close(self) -> None:
        if self.handle:
            self.handle.close()


def append_rows(path: Path, rows: Sequence[dict]) -> None:
    """Append rows to a JSONL file (its folder made if missing), each flushed and fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = RowWriter(path)
    try:
        for row in rows:
            writer.write(row)
    finally:
        writer.close()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file in the same directory, then rename it over ``path``."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: Path, rows: Sequence[dict]) -> None:
    """Replace a JSONL file as a whole (one row per line), atomically."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
