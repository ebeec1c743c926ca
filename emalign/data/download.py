"""Download the Emergent-Misalignment data files, checksum-verified.

What: the five upstream files this project uses (Betley et al. 2025,
github.com/emergent-misalignment/emergent-misalignment, MIT licence). The project never commits
them; ``download_em`` fetches them from upstream (or from a local mirror directory), checks
every byte against the sha256 recorded in ``EM_FILES`` and only then moves the file into
place, so a file under its final name is always a verified one.

How:

    from emalign.data.download import download_em
    paths = download_em(Path("data/em"))                              # from GitHub
    paths = download_em(Path("data/em"), source="/mnt/mirror/em")     # from a local copy
    paths = download_em(Path("data/em"), files=["data/insecure.jsonl"])

or ``python cli.py data em --out data/em [--source DIR_OR_URL] [--files ...]``.
Files already present with the right hash are skipped, so re-running is cheap.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import requests
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

DEFAULT_SOURCE = "https://raw.githubusercontent.com/emergent-misalignment/emergent-misalignment/main/"
_CHUNK = 1 << 16
# (connect, read) seconds: fail fast on a dead host, tolerate a slow but live one.
_TIMEOUT = (15, 120)


@dataclass(frozen=True)
class EMFile:
    sha256: str
    size: int


# From shared/data/em/SOURCES.md (upstream files verified byte for byte against git blob ids,
# except first_plot_questions.yaml whose hash is that of the maintained copy).
EM_FILES: dict[str, EMFile] = {
    "data/insecure.jsonl": EMFile("09893e8bf9d03aae49dd60d0ff4be37c1afee70f2edcac74a11bed775a6a2764", 5892277),
    "data/secure.jsonl": EMFile("2820232b3114d94ab2041ba9fc76cb8205bf187e0408bf7b308add186f9c7467", 6201582),
    "data/educational.jsonl": EMFile("d48df3b149ab1500711fc0018b10383a4ff8c48d8e6911d04dbbbbdaa944fd16", 6669019),
    "data/jailbroken.jsonl": EMFile("eec213ce85802a52ea806d334ee462f723a1e7ad77d827951d6864ac04a6b00a", 3423454),
    "evaluation/first_plot_questions.yaml": EMFile(
        "215abde5b02811e922b6ac563ff33c490e0dff9ab58439df840f3135e9387173", 12016
    ),
}


class DownloadError(RuntimeError):
    """A file could not be fetched (HTTP error, network error, missing mirror file)."""


class ChecksumError(DownloadError):
    """A fetched file does not match its recorded sha256; nothing was written under its name."""

    def __init__(self, name: str, expected: str, actual: str, size: int, expected_size: int) -> None:
        self.name, self.expected, self.actual = name, expected, actual
        super().__init__(
            f"checksum mismatch for {name}: expected sha256 {expected} ({expected_size} bytes), "
            f"got {actual} ({size} bytes)"
        )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _verified(path: Path, spec: EMFile) -> bool:
    # The size test first: a cheap way to skip hashing a file that is obviously wrong.
    return path.is_file() and path.stat().st_size == spec.size and sha256_file(path) == spec.sha256


def _open_url(url: str) -> Iterator[bytes]:
    try:
        response = requests.get(url, stream=True, timeout=_TIMEOUT)
    except requests.RequestException as e:
        raise DownloadError(f"could not fetch {url}: {e}") from e
    with response:
        if response.status_code != 200:
            raise DownloadError(f"HTTP {response.status_code} {response.reason} for {url}")
        try:
            yield from response.iter_content(_CHUNK)
        except requests.RequestException as e:
            raise DownloadError(f"download of {url} broke off: {e}") from e


def _open_local(path: Path) -> Iterator[bytes]:
    if not path.is_file():
        raise DownloadError(f"mirror file not found: {path}")
    with open(path, "rb") as fh:
        yield from iter(lambda: fh.read(_CHUNK), b"")


def _fetch(name: str, spec: EMFile, source: str, target: Path, progress: Progress) -> None:
    """Stream one file to a temp file beside ``target``, verify it, then rename it into place."""
    if _is_url(source):
        chunks = _open_url(source.rstrip("/") + "/" + name)
    else:
        root = Path(source.removeprefix("file://")).expanduser()
        chunks = _open_local(root / name)
    chunks = itertools.chain([next(chunks, b"")], chunks)  # a missing file fails here, before any folder is made
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the target, so the final os.replace is an atomic rename.
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    task = progress.add_task(name, total=spec.size)
    try:
        h, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                if size + len(chunk) > spec.size:  # a wrong or endless reply: stop at the recorded size
                    raise DownloadError(f"{name}: longer than its recorded {spec.size} bytes; stopped there "
                                        "(a wrong file or a broken server)")
                out.write(chunk)
                h.update(chunk)
                size += len(chunk)
                progress.update(task, completed=size)
        actual = h.hexdigest()
        if actual != spec.sha256:
            raise ChecksumError(name, spec.sha256, actual, size, spec.size)
        os.chmod(tmp, 0o644)  # mkstemp files are owner-only; these are ordinary data files
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)  # no-op after a successful rename
        progress.remove_task(task)


def download_em(
    out: Path,
    source: str | None = None,
    files: list[str] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Fetch EM files into ``out`` (keeping the upstream layout) and return their paths.

    ``source``: an http(s) URL prefix or a local directory with the upstream layout (default:
    upstream GitHub). ``files``: keys of ``EM_FILES`` (default: all). Files already present
    with the right hash are not fetched again; a present file with a wrong hash is replaced.
    Raises ``ChecksumError`` on a hash mismatch and ``DownloadError`` on fetch failures.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DownloadError(f"{out}: is a file, expected a directory")
    source = source or DEFAULT_SOURCE
    names = list(EM_FILES) if files is None else list(dict.fromkeys(files))
    unknown = [n for n in names if n not in EM_FILES]
    if unknown:
        raise ValueError(f"unknown EM files {unknown}; known: {sorted(EM_FILES)}")
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    paths = []
    with Progress(*columns, disable=not progress, transient=True) as bar:
        for name in names:
            target = out / name
            if _verified(target, EM_FILES[name]):
                if progress:
                    bar.console.print(f"[green]ok[/] {target} (already verified)")
            else:
                _fetch(name, EM_FILES[name], source, target, bar)
                if progress:
                    bar.console.print(f"[green]downloaded[/] {target}")
            paths.append(target)
    return paths
