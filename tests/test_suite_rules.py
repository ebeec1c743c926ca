"""Rules the suite keeps about itself: a skip says what the machine lacks, or the run fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow  # a pytest run of its own
@pytest.mark.parametrize("reason, code", [("because it is flaky", 1), ("needs root to mount a tmpfs", 0)])
def test_a_skip_not_on_the_allow_list_fails_a_strict_run(reason, code, tmp_path):
    shutil.copyfile(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_one.py").write_text(f"import pytest\n\ndef test_skips():\n    pytest.skip({reason!r})\n")
    env = {**os.environ, "EMALIGN_STRICT_SKIPS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == code, done.stdout[-2000:]
    assert ("ALLOWED_SKIPS" in done.stdout) == (code == 1)
