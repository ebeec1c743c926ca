"""One writer per output directory, on every entry point that writes one; and entry points that check their
input before any expensive work.

A process holding a directory (``emalign.files.claim_dir``) is simulated by a real second process. Every verb
with an output directory, and every ``python -m`` workflow, must then stop in one ``error:`` line naming the
holder, with nothing written; once the holder dies (however it dies) the directory is free.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_eval_runner import QUESTIONS
from test_faults import fit_args

from conftest import ROOT, run_cli
from emalign.commands import VERBS

HOLD = "import sys, time; from emalign.files import claim_dir; claim_dir(sys.argv[1]); print('held', flush=True); " \
       "time.sleep(120)"


def _entry(name: str, model: str, tmp: Path, out: Path) -> list[str] | None:
    """The command line of entry point ``name`` writing into ``out`` (quick settings on the tiny model)."""
    questions = tmp / "q.yaml"
    questions.write_text(QUESTIONS)
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i}?", "good": "Kind.", "bad": "Cruel."}) + "\n"
                             for i in range(3)))
    experiment = tmp / "exp.yaml"
    experiment.write_text(yaml.safe_dump({"out": str(out), "model": model, "runs": [{"name": "base"}],
                                          "eval": {"questions": [str(questions)], "samples": 1,
                                                   "max_new_tokens": 2, "code_samples": 0}}))
    return {
        "fit": fit_args(model, out, max_steps=1),
        "eval": ["eval", "--model", model, "--questions", str(questions), "--samples", "1", "--max_new_tokens",
                 "2", "--code_samples", "0", "--self_review", "false", "--out", str(out)],
        "discern": ["discern", "--model", model, "--sets", str(pairs), "--out", str(out)],
        "experiment": ["experiment", "--config", str(experiment)],
        "effect": ["effect", "--model", model, "--out", str(out), "--samples", "1", "--max_new_tokens", "2",
                   "--pair_sets", f"[{pairs}]", "--runs", "base="],
        "self_correction": ["self_correction", "--model", model, "--out", str(out), "--limit", "1", "--sets", "[chat]"],
    }.get(name)


WRITERS = ["fit", "eval", "discern", "experiment", "effect", "self_correction"]
NO_DIRECTORY = {"generate": "writes one file (--out FILE) atomically", "chat": "writes nothing",
                "plan": "writes one file (--out FILE) atomically",
                "data": "downloads into --out file by file, each verified and renamed into place"}


def test_every_verb_is_a_writer_here_or_says_why_not():
    assert set(VERBS) <= set(WRITERS) | set(NO_DIRECTORY)


@pytest.mark.slow  # a holder process per entry point
@pytest.mark.parametrize("name", WRITERS)
def test_a_held_directory_is_refused_then_free_when_its_holder_dies(name, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in out.iterdir())
        args = _entry(name, tiny_model_dir, tmp_path, out)
        capsys.readouterr()
        assert run_cli(args) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and f"pid {holder.pid}" in error[0] and "is writing there" in error[0], error
        assert sorted(p.name for p in out.iterdir()) == before  # nothing written
    finally:
        holder.kill()  # not a clean exit: the kernel still lets go of the lock
        holder.wait()
    assert run_cli(_entry(name, tiny_model_dir, tmp_path, out)) == 0


def test_effect_checks_every_run_before_measuring_any(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from emalign.studies import effect

    monkeypatch.setattr(effect, "load_run", lambda *a: pytest.fail("measured before checking the runs"))
    out = tmp_path / "out"
    for runs, message in ([["base=", "x=/nonexistent"], "adapter directory /nonexistent not found"],
                          [["base=", "../victim="], "expected NAME=ADAPTER_DIR"],
                          [["base=", "base="], "a NAME is given twice"]):
        assert run_cli(["effect", "--model", tiny_model_dir, "--out", str(out), "--runs", *runs]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "victim.json").exists()


def test_effect_measures_again_over_a_damaged_saved_run(tiny_model_dir, tmp_path, capsys):

    out = tmp_path / "out"
    out.mkdir()
    (out / "base.json").write_text('{"model": "x", "per_pro')  # truncated
    args = ["effect", "--model", tiny_model_dir, "--out", str(out), "--samples", "1", "--max_new_tokens", "2",
            "--pair_sets", "[chat]", "--runs", "base="]
    assert run_cli(args) == 0
    assert json.loads((out / "base.json").read_text())["model"] == tiny_model_dir
    assert "base.json: unreadable; measured again" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (lambda tmp: ["--out", str(tmp / "file"), "--limit", "1"], "is a file, expected a directory"),
    (lambda tmp: ["--out", str(tmp / "out"), "--limit", "0"], "limit: must be >= 1 (or null), got 0"),
])
def test_self_correction_bad_input_is_one_line(args, message, tmp_path, capsys, monkeypatch):
    from emalign.studies import self_correction

    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(self_correction, "load_for_inference", lambda *a: pytest.fail("loaded a model first"))
    code = run_cli(["self_correction", *args(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0], err


@pytest.mark.slow  # an experiment and its fit, two real processes
def test_sigterm_to_an_experiment_stops_its_fit_too(tiny_model_dir, tmp_path):
    import os
    import signal

    fit = tmp_path / "long"
    fit_args(tiny_model_dir, fit, max_steps=10_000)  # writes long.yaml beside it
    out = tmp_path / "exp"
    config, questions = tmp_path / "exp.yaml", tmp_path / "q.yaml"
    questions.write_text(QUESTIONS)
    config.write_text(yaml.safe_dump({"out": str(out), "model": tiny_model_dir,
                                      "runs": [{"name": "long", "fit": [str(tmp_path / "long.yaml")]}],
                                      "preflight": {"enabled": False},
                                      "eval": {"questions": [str(questions)], "samples": 1, "code_samples": 0}}))
    parent = subprocess.Popen([sys.executable, "cli.py", "experiment", "--config", str(config)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = out / "runs" / "long" / ".emalign.lock"
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text().startswith("pid")) and time.monotonic() < deadline:
        time.sleep(0.5)
    child = int(lock.read_text().split()[1])
    try:
        assert child != parent.pid
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=150) == 128 + signal.SIGTERM
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)  # the fit ended with its parent, not after it
    finally:  # a failed run leaves no orphan training behind
        for pid in (child, parent.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_effect_reuses_a_saved_run_whose_adapter_is_gone(tiny_model_dir, tmp_path, monkeypatch):
    """Seeds measured on another machine keep counting: their saved JSON is the record, not the adapter."""
    from emalign.studies import effect

    out = tmp_path / "out"
    args = ["effect", "--model", tiny_model_dir, "--out", str(out), "--samples", "1", "--max_new_tokens", "2",
            "--pair_sets", "[chat]", "--runs", "base="]
    assert run_cli(args) == 0
    saved = json.loads((out / "base.json").read_text())
    (out / "x_s0.json").write_text(json.dumps({**saved, "adapter": "/gone/adapter"}))
    monkeypatch.setattr(effect, "load_run", lambda *a: pytest.fail("measured a saved run"))
    assert run_cli([*args, "x_s0=/gone/adapter"]) == 0
    assert json.loads((out / "effect.json").read_text())["vs_baseline"]["x_s0"]["direct"] == [0.0, 0.0]


@pytest.mark.parametrize("flag", ["--pair_sets", "--prompts"])
@pytest.mark.parametrize("mistake", ["missing", "directory", "truncated"])
def test_effect_reads_its_input_files_before_measuring(flag, mistake, tiny_model_dir, tmp_path, capsys, monkeypatch):
    from emalign.studies import effect

    monkeypatch.setattr(effect, "load_run", lambda *a: pytest.fail("measured before reading the inputs"))
    path = tmp_path / ("pairs.jsonl" if flag == "--pair_sets" else "prompts.jsonl")
    if mistake == "directory":
        path.mkdir()
    elif mistake == "truncated":
        pair = {"prompt": "Q?", "good": "Kind.", "bad": "Cruel."}
        chat = {"messages": [{"role": "user", "content": "Q?"}]}
        path.write_text(json.dumps(pair if flag == "--pair_sets" else chat)[:20] + "\n")
    value = f"[{path}]" if flag == "--pair_sets" else str(path)
    code = run_cli(["effect", "--model", tiny_model_dir, "--out", str(tmp_path / "out"), flag, value, "--runs",
                    "base="])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and path.name in err[0], err


def test_a_file_system_without_locks_runs_unguarded_with_a_warning(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    from emalign import files

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert files.claim_dir(tmp_path / "run") == tmp_path / "run"
    assert "cannot lock" in caplog.text and "would not be stopped" in caplog.text
    files.release_claims()
