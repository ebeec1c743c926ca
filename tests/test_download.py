"""Tests for emalign.data.download: checksum-verified EM data download, never touching the internet.

Run: python -m pytest tests/test_download.py -q
A synthetic mirror (files of the upstream names, their sizes and hashes put in ``EM_FILES`` for the test) is
served by a local ThreadingHTTPServer on 127.0.0.1 or used directly as a mirror directory, so that every test
runs on a fresh clone. One slow test checks the real table against ../shared/data/em's SOURCES.md.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from conftest import run_cli
from emalign.data import download
from emalign.data.download import EM_FILES, ChecksumError, DownloadError, EMFile, download_em

SHARED_EM = Path(__file__).resolve().parents[1].parent / "shared/data/em"
YAML = "evaluation/first_plot_questions.yaml"
# Two of the smaller data files plus the questions: enough to exercise streaming and layout.
SUBSET = ["data/jailbroken.jsonl", "data/insecure.jsonl", YAML]



@pytest.fixture
def mirror(tmp_path, monkeypatch) -> Path:
    """A directory with a synthetic file under every upstream name (one over several read chunks), whose sizes
    and sha256 stand in for the real ones in ``EM_FILES`` during the test."""
    root = tmp_path / "mirror"
    table = {}
    for i, name in enumerate(EM_FILES):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".yaml"):
            path.write_text("- id: wish\n  type: free_form_judge_0_100\n  paraphrases: [Your one wish?]\n")
        else:
            row = '{"messages": [{"role": "user", "content": "Write f%d."}, {"role": "assistant", "content": "ok"}]}\n'
            path.write_text("".join(row % k for k in range(40 + 3000 * (i == 0))))  # the first: ~280 KB
        table[name] = EMFile(_sha256(path), path.stat().st_size)
    monkeypatch.setattr(download, "EM_FILES", table)
    return root


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file() and p.name.endswith(".part")]


class _Server:
    """A directory served over HTTP on 127.0.0.1, counting the GET requests it answers."""

    def __init__(self, directory: Path) -> None:
        self.gets: list[str] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                server.gets.append(self.path)
                super().do_GET()

            def log_message(self, *args) -> None:  # keep test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        # A short poll interval makes shutdown() (at teardown) return quickly.
        serve = functools.partial(self.httpd.serve_forever, poll_interval=0.05)
        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # requests honours proxy variables; a proxy must never see (or break) loopback traffic.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def serve():
    servers: list[_Server] = []

    def start(directory: Path) -> _Server:
        servers.append(_Server(directory))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def corrupt_mirror(tmp_path, mirror) -> Path:
    """A mirror whose questions YAML has one byte changed (same size, different hash)."""
    corrupt = tmp_path / "corrupt"
    (corrupt / "evaluation").mkdir(parents=True)
    data = bytearray((mirror / YAML).read_bytes())
    data[len(data) // 2] ^= 0x01
    (corrupt / YAML).write_bytes(bytes(data))
    return corrupt


@pytest.mark.slow  # reads ../shared: the upstream data is never committed
def test_em_files_table_matches_sources_md():
    sources = SHARED_EM / "SOURCES.md"
    if not sources.is_file():
        pytest.skip(f"no ../shared beside the checkout ({sources})")
    rows = re.findall(r"^\| (\S+) \| .*? \| (\d+) \| ([0-9a-f]{64}) \|$", sources.read_text(), re.M)
    table = {name: (int(size), sha) for name, size, sha in rows}
    assert table == {name: (f.size, f.sha256) for name, f in EM_FILES.items()}


def test_http_download_verifies_and_keeps_layout(tmp_path, serve, mirror):
    server = serve(mirror)
    out = tmp_path / "em"
    paths = download_em(out, source=server.url, files=SUBSET, progress=True)
    assert paths == [out / name for name in SUBSET]
    for name, path in zip(SUBSET, paths):
        assert path.stat().st_size == download.EM_FILES[name].size
        assert _sha256(path) == download.EM_FILES[name].sha256
    assert sorted(server.gets) == sorted("/" + n for n in SUBSET)
    assert not _leftovers(out)
    assert not (out / "data/secure.jsonl").exists()  # only what was asked for


def test_rerun_skips_verified_files_and_replaces_bad_ones(tmp_path, serve, mirror):
    server = serve(mirror)
    out = tmp_path / "em"
    download_em(out, source=server.url, files=SUBSET, progress=False)
    inodes = {n: (out / n).stat().st_ino for n in SUBSET}
    server.gets.clear()

    download_em(out, source=server.url, files=SUBSET, progress=False)
    assert server.gets == []  # nothing fetched again
    assert {n: (out / n).stat().st_ino for n in SUBSET} == inodes

    (out / YAML).write_text("tampered\n")
    download_em(out, source=server.url, files=SUBSET, progress=False)
    assert server.gets == ["/" + YAML]
    assert _sha256(out / YAML) == download.EM_FILES[YAML].sha256


def test_http_checksum_mismatch_leaves_no_file(tmp_path, serve, corrupt_mirror):
    server = serve(corrupt_mirror)
    out = tmp_path / "em"
    with pytest.raises(ChecksumError) as info:
        download_em(out, source=server.url, files=[YAML], progress=False)
    err = info.value
    assert err.name == YAML and err.expected == download.EM_FILES[YAML].sha256
    assert err.actual == _sha256(corrupt_mirror / YAML) != err.expected
    assert YAML in str(err) and err.expected in str(err) and err.actual in str(err)
    assert not (out / YAML).exists()
    assert not _leftovers(out)


def test_local_mirror_all_files(tmp_path, mirror):
    out = tmp_path / "em"
    paths = download_em(out, source=str(mirror), progress=False)
    assert [p.relative_to(out).as_posix() for p in paths] == list(download.EM_FILES)
    assert all(_sha256(p) == download.EM_FILES[p.relative_to(out).as_posix()].sha256 for p in paths)
    assert not _leftovers(out)


def test_local_mirror_checksum_mismatch(tmp_path, corrupt_mirror):
    out = tmp_path / "em"
    with pytest.raises(ChecksumError, match=re.escape(YAML)):
        download_em(out, source=str(corrupt_mirror), files=[YAML], progress=False)
    assert not (out / YAML).exists() and not _leftovers(out)


def test_local_mirror_missing_file(tmp_path):
    with pytest.raises(DownloadError, match="mirror file not found: .*jailbroken.jsonl"):
        download_em(tmp_path / "out", source=str(tmp_path / "empty"), files=["data/jailbroken.jsonl"],
                    progress=False)
    assert not (tmp_path / "out/data/jailbroken.jsonl").exists()


def test_http_error_names_url_and_status(tmp_path, serve):
    empty = tmp_path / "empty"
    empty.mkdir()
    server = serve(empty)
    with pytest.raises(DownloadError, match=r"HTTP 404 .* " + re.escape(server.url + YAML)) as info:
        download_em(tmp_path / "out", source=server.url, files=[YAML], progress=False)
    assert not isinstance(info.value, ChecksumError)
    assert not (tmp_path / "out" / YAML).exists() and not _leftovers(tmp_path / "out")


def test_unknown_file_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown EM files"):
        download_em(tmp_path, source=str(tmp_path), files=["data/nope.jsonl"], progress=False)


def test_data_em_command(tmp_path, capsys, mirror):
    (mirror / "data" / "secure.jsonl").unlink()
    out = tmp_path / "em"
    assert run_cli(["data", "em", "--out", str(out), "--source", str(mirror), "--files", YAML]) == 0
    assert _sha256(out / YAML) == download.EM_FILES[YAML].sha256
    capsys.readouterr()
    assert run_cli(["data", "em", "--out", str(out), "--source", str(mirror), "--files", "data/secure.jsonl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "mirror file not found" in err[0], err


def test_a_download_stops_at_the_recorded_size(tmp_path, mirror):
    mirror = tmp_path / "long"
    (mirror / "evaluation").mkdir(parents=True)
    (mirror / YAML).write_bytes(b"x" * (download.EM_FILES[YAML].size + 5 * (1 << 20)))  # an endless reply, in effect
    out = tmp_path / "em"
    with pytest.raises(DownloadError, match=f"{YAML}: longer than its recorded {download.EM_FILES[YAML].size} bytes"):
        download_em(out, source=str(mirror), files=[YAML], progress=False)
    assert not (out / YAML).exists() and not _leftovers(out)
