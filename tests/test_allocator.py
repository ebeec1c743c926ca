"""The allocator setting returns freed tensor memory to the system (glibc's default keeps it)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import sys, torch
sys.path.insert(0, {root!r})
from emalign.allocator import release_freed_memory
print(release_freed_memory() if sys.argv[1] == "on" else False)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
base = rss()
for _ in range(3):
    xs = [torch.ones(1024, 1024) for _ in range(64)]  # 64 tensors of 4 MiB, as activations are
    del xs
print(rss() - base)
"""


def retained_mb(mode: str) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT)), mode], capture_output=True, text=True,
                         check=True, env={"PATH": "/usr/bin:/bin"}).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_tensors_leave_the_process():
    took, on = retained_mb("on")
    assert took
    _, off = retained_mb("off")
    assert on < 16, f"{on:.0f} MB of freed tensors stayed resident with the setting"
    assert off > 100, f"glibc's default kept only {off:.0f} MB: the probe no longer shows the problem"


def test_it_is_opt_in(monkeypatch):
    from emalign import allocator

    calls = []
    monkeypatch.setattr(allocator, "release_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.delenv(allocator.ENV, raising=False)
    assert not allocator.configure_from_environment() and not calls
    monkeypatch.setenv(allocator.ENV, "1")
    assert allocator.configure_from_environment() and calls == [1]


def test_a_threshold_the_user_set_is_kept(monkeypatch):
    from emalign.allocator import release_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert not release_freed_memory()
