"""What ``pip install .`` puts into site-packages: the ``emalign`` package and its ``emalign`` command only
(the checkout's ``cli.py`` and ``callbacks/`` are aliases that stay in the checkout)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_the_wheel_holds_the_emalign_package_and_command_only(tmp_path):
    source = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info into the tree it builds
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in tracked.splitlines():
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("emalign-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = next(n.split("/")[0] for n in names if ".dist-info/" in n)
    assert {n.split("/")[0] for n in names} == {"emalign", dist_info}  # no top-level cli.py or callbacks/
    assert {"emalign/callbacks/conscience.py", "emalign/commands/cli.py", "emalign/resources/calibration.jsonl"} \
        <= set(names)
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "emalign = emalign.commands.cli:main" in entry_points
