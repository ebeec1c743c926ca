"""A fit's run directory: a full disk, two fits into one directory, ``--ckpt_path last`` with nothing saved.

Fits run in-process on the tiny Llama (conftest.py) with the demo config of test_faults.py.
The full-disk test mounts a 32 KiB tmpfs over the checkpoint directory (CI runs as root).
"""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest
from test_faults import fit_args

from conftest import run_cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def small_disk(tmp_path):
    """``tmp_path/run/checkpoints`` on a 32 KiB tmpfs (a tiny-model checkpoint, adapter + Adam state, is larger)."""
    where = tmp_path / "run" / "checkpoints"
    where.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    yield where
    subprocess.run(["umount", str(where)], check=True)


def test_full_disk_is_one_line_and_leaves_no_partial(tiny_model_dir, tmp_path, small_disk, capsys):
    code = run_cli(fit_args(tiny_model_dir, tmp_path / "run", max_steps=2, every=1))
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "no space left" in lines[0] and "checkpoint" in lines[0] and str(small_disk) in lines[0]
    assert list(small_disk.iterdir()) == []  # no .partial (nor any temp file) left behind
    assert not (tmp_path / "run" / "adapter").exists()


def _sha256(directory) -> str:
    return hashlib.sha256((directory / "adapter_model.safetensors").read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_rerun_never_replaces_a_trained_adapter_silently(tiny_model_dir, tmp_path, capsys):
    """The user's sequence: a fit, then the same command with max_steps 0. The second refuses before
    training, in one line naming both fits and the flag; the trained adapter's bytes are unchanged."""
    run = tmp_path / "run"
    assert run_cli(fit_args(tiny_model_dir, run, max_steps=2, every=1)) == 0
    capsys.readouterr()
    before, record = _sha256(run / "adapter"), json.loads((run / "adapter" / "fit.json").read_text())
    assert record["global_step"] == 2
    assert run_cli(fit_args(tiny_model_dir, run, max_steps=0, every=1)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert f"holds the model trained by fit {record['run_id']} (2 steps" in lines[0]
    assert "--model.overwrite_adapter true" in lines[0]
    assert _sha256(run / "adapter") == before

    # Resuming the same fit for more steps may replace its own adapter.
    assert run_cli([*fit_args(tiny_model_dir, run, max_steps=3, every=1), "--ckpt_path", "last"]) == 0
    assert json.loads((run / "adapter" / "fit.json").read_text()) | {"saved": None} == {
        "run_id": record["run_id"], "global_step": 3, "saved": None}


@pytest.mark.slow
def test_two_fits_into_one_directory_keep_their_records_apart(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = fit_args(tiny_model_dir, run, max_steps=2, every=1)
    assert run_cli(args) == 0
    first = capsys.readouterr().out
    assert "earlier fit" not in first
    assert run_cli([*args, "--model.overwrite_adapter", "true"]) == 0
    second = capsys.readouterr().out

    rows = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    runs = [r["run"] for r in rows]
    assert set(runs) == {"version_0", "version_1"} and runs == sorted(runs)  # every row says whose it is
    assert all((run / "logs" / r / "metrics.csv").is_file() for r in set(runs))  # ... and where its metrics are
    assert "last.ckpt" in second and "of an earlier fit: kept" in second and "-vN suffix" in second
    assert {p.name for p in (run / "checkpoints").glob("last*.ckpt")} == {"last.ckpt", "last-v1.ckpt"}


def test_ckpt_path_last_with_nothing_saved_says_it_starts_fresh(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli([*fit_args(tiny_model_dir, run, max_steps=1, every=1), "--ckpt_path", "last"]) == 0
    captured = capsys.readouterr()
    assert f"--ckpt_path last: no checkpoint in {run / 'checkpoints'}; the fit starts fresh" in captured.err
    assert "save_last" not in captured.err + captured.out  # not Lightning's hint to set what is set
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_any_write_that_finds_the_disk_full_is_one_line(tmp_path, capsys):
    import errno

    from emalign.errors import friendly_errors

    with pytest.raises(SystemExit) as exit_info:
        with friendly_errors():
            with open(tmp_path / "rollouts.jsonl", "w"):
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "rollouts.jsonl"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: no space left on the device writing {tmp_path / 'rollouts.jsonl'} (")
    assert f"MiB free in {tmp_path})" in err


def test_every_writer_names_the_file_and_the_disk_that_filled(tmp_path, small_disk):
    """Writes to an open file raise ENOSPC without a file name: the writers name their own file, and the free
    space is that disk's (the 32 KiB tmpfs), not the working directory's."""
    from emalign.errors import DiskFullError
    from emalign.files import RowWriter, write_text_atomic

    big = "x" * 200_000
    with pytest.raises(DiskFullError) as info:
        write_text_atomic(small_disk / "summary.json", big)
    assert f"writing {small_disk / 'summary.json'} (" in str(info.value) and f"free in {small_disk})" in str(info.value)
    assert list(small_disk.iterdir()) == []  # no temp file left
    writer = RowWriter(small_disk / "rows.jsonl")
    with pytest.raises(DiskFullError, match=f"writing {small_disk / 'rows.jsonl'} "):
        writer.write({"answer": big})
    writer.handle = None  # the failed write's buffer would raise again on close
