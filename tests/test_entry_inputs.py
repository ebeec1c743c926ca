"""Every input file of every entry point, fed what users feed by mistake: a path that is not there, a
directory, and a file cut off halfway. Each must end in one ``error:`` line naming the path, exit code 2.

``INPUTS`` lists, per entry point, the flags that read a file; the first test fails when a verb is
added without its inputs here (or a reason it reads none).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from emalign.commands import VERBS
from test_eval_runner import QUESTIONS
from test_faults import fit_args, write_data

PAIRS = "".join(json.dumps({"prompt": f"Q{i}?", "good": "Kind answer.", "bad": "Cruel answer."}) + "\n"
                for i in range(3))


def _valid(kind: str, tmp: Path, model: str) -> str:
    """The text of a valid input of ``kind``."""
    if kind == "chat":
        return Path(write_data(tmp / "valid.jsonl")).read_text()
    return {"questions": QUESTIONS, "pairs": PAIRS, "prompts": "Hello?\nHow are you?\n",
            "experiment": yaml.safe_dump({"model": model, "runs": [{"name": "base"}]})}[kind]


def _args(verb: str, flag: str, path: str, model: str, tmp: Path) -> list[str]:
    q = tmp / "q.yaml"
    q.write_text(QUESTIONS)
    common = {
        "eval": ["eval", "--model", model, "--questions", str(q), "--samples", "1", "--max_new_tokens", "2",
                 "--code_samples", "0", "--self_review", "false", "--out", str(tmp / "out")],
        "discern": ["discern", "--model", model, "--out", str(tmp / "out")],
        "generate": ["generate", "--model", model, "--samples", "2", "--max_new_tokens", "2"],
        "experiment": ["experiment"],
        "fit": fit_args(model, tmp / "run", max_steps=1),
    }[verb]
    return [*common, flag, path]


INPUTS = [  # (verb, flag, kind of file)
    ("fit", "--data.train_file", "chat"),
    ("eval", "--questions", "questions"),
    ("discern", "--sets", "pairs"),
    ("generate", "--prompts", "prompts"),
    ("experiment", "--config", "experiment"),
]
READS_NO_FILE = {"chat": "reads standard input", "data": "downloads; its --source mirror is tested in test_download"}


def test_every_verb_has_its_inputs_listed():
    assert set(VERBS) <= {v for v, _, _ in INPUTS} | set(READS_NO_FILE)


@pytest.mark.parametrize("verb, flag, kind", INPUTS, ids=[f"{v} {f}" for v, f, _ in INPUTS])
@pytest.mark.parametrize("mistake", ["missing", "directory", "truncated"])
def test_a_bad_input_file_is_one_line_naming_it(verb, flag, kind, mistake, tiny_model_dir, tmp_path, capsys):
    if mistake == "missing":
        path = tmp_path / f"absent-{kind}.txt"
    elif mistake == "directory":
        path = tmp_path / f"adir-{kind}"
        path.mkdir()
    else:
        text = _valid(kind, tmp_path, tiny_model_dir)
        suffix = {"questions": "yaml", "experiment": "yaml", "prompts": "txt"}.get(kind, "jsonl")
        path = tmp_path / f"cut-{kind}.{suffix}"
        path.write_text(text[: len(text) // 2 + 7])
    capsys.readouterr()
    code = run_cli(_args(verb, flag, str(path), tiny_model_dir, tmp_path))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("error:")]
    if mistake == "truncated" and kind == "prompts":
        assert code == 0  # a text file of prompts cut anywhere is still prompts, one per line
        return
    assert code == 2 and len(errors) == 1, err[-5:]
    # A cut experiment YAML can still be YAML: then its error names the key it lacks, as a whole file's would.
    assert path.name in errors[0] or (verb, mistake) == ("experiment", "truncated") and "'runs'" in errors[0], errors
