"""The allocator setting returns freed tensor memory to the system (glibc's default keeps it)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import sys, torch
sys.path.insert(0, {root!r})
from emalign.models.allocator import release_freed_memory
print(release_freed_memory() if sys.argv[1] == "on" else False)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
base = rss()
pins = []
for _ in range(3):
    xs = [torch.ones(1024, 1024) for _ in range(64)]  # 64 tensors of 4 MiB, as activations are
    # A live tensor above them, as the rest of a step's state is: without it the freed block can sit at the
    # heap's top, which glibc trims anyway (the probe then read 6 MB in 1 of 3 runs instead of 265).
    pins.append(torch.ones(4096))
    del xs
print(rss() - base)
"""


def retained_mb(mode: str) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT)), mode], capture_output=True, text=True,
                         check=True, env={"PATH": "/usr/bin:/bin"}).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_tensors_leave_the_process():
    took, on = retained_mb("on")
    assert took
    _, off = retained_mb("off")
    assert on < 16, f"{on:.0f} MB of freed tensors stayed resident with the setting"
    assert off > 100, f"glibc's default kept only {off:.0f} MB: the probe no longer shows the problem"


def test_the_callback_applies_it_to_a_cpu_fit_only(monkeypatch):
    from types import SimpleNamespace

    import emalign.callbacks.memory as memory
    from emalign.callbacks import ReleaseFreedMemory

    calls = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda threshold: calls.append(threshold) or True)
    on = lambda device: SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))  # noqa: E731
    callback = ReleaseFreedMemory(threshold_mib=2)
    callback.setup(on("meta"), None, "fit")
    assert calls == [] and not callback.applied
    callback.setup(on("cpu"), None, "fit")
    assert calls == [2 << 20] and callback.applied


def test_a_threshold_the_user_set_is_kept(monkeypatch):
    from emalign.models.allocator import release_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert not release_freed_memory()
