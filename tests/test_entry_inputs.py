"""Every input file of every entry point, fed what users feed by mistake: a path that is not there, a
directory, and a file cut off halfway. Each must end in one ``error:`` line naming the path, exit code 2.

``INPUTS`` lists, per verb, the flags that read a file, and ``MODULES`` each ``python -m`` module: the first
tests fail when a verb or a module with a ``__main__`` is added without its inputs here (or a reason it reads
none).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_eval_runner import QUESTIONS
from test_faults import fit_args, write_data

from conftest import run_cli
from emalign.commands import VERBS

PAIRS = "".join(json.dumps({"prompt": f"Q{i}?", "good": "Kind answer.", "bad": "Cruel answer."}) + "\n"
                for i in range(3))


def _valid(kind: str, tmp: Path, model: str) -> str:
    """The text of a valid input of ``kind``."""
    if kind == "chat":
        return Path(write_data(tmp / "valid.jsonl")).read_text()
    if kind == "model_config":
        return Path(model, "config.json").read_text()
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
        "effect": ["effect", "--model", model, "--out", str(tmp / "out"), "--runs", "base=", "--samples", "1",
                   "--max_new_tokens", "2", "--pair_sets", "code"],
        "fit": fit_args(model, tmp / "run", max_steps=1),
        "plan": ["plan", *fit_args(model, tmp / "run", max_steps=1)[1:]],
    }[verb]
    return [*common, flag, path]


INPUTS = [  # (verb, flag, kind of file)
    ("fit", "--data.train_file", "chat"),
    ("eval", "--questions", "questions"),
    ("discern", "--sets", "pairs"),
    ("generate", "--prompts", "prompts"),
    ("experiment", "--config", "experiment"),
    ("effect", "--pair_sets", "pairs"),
    ("effect", "--prompts", "prompts"),
    ("plan", "--model_config", "model_config"),
]
READS_NO_FILE = {"chat": "reads standard input", "data": "downloads; its --source mirror is tested in test_download",
                 "self_correction": "reads the embedded sets only"}


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
        suffixes = {"questions": "yaml", "experiment": "yaml", "prompts": "txt", "model_config": "json"}
        suffix = suffixes.get(kind, "jsonl")
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


MODULES = {"emalign.evaluation.codesec": "chat"}
"""``python -m`` modules that read a file (their first argument), and what kind."""
MODULES_READING_NO_FILE = {"emalign.data.embedded": "reads and writes the package's own resources only"}


def _main_modules() -> set[str]:
    root = Path(__file__).resolve().parents[1]
    return {".".join(p.relative_to(root).with_suffix("").parts) for p in (root / "emalign").rglob("*.py")
            if 'if __name__ == "__main__":' in p.read_text(encoding="utf-8")}


def test_every_module_entry_point_has_its_inputs_listed():
    assert _main_modules() == set(MODULES) | set(MODULES_READING_NO_FILE) | {"emalign.commands.cli"}


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("mistake", ["missing", "directory", "truncated"])
def test_a_module_fed_a_bad_file_says_so_in_one_line(module, mistake, tmp_path, capsys):
    import importlib

    path = tmp_path / {"missing": "absent.jsonl", "directory": "adir", "truncated": "cut.jsonl"}[mistake]
    if mistake == "directory":
        path.mkdir()
    elif mistake == "truncated":
        text = _valid(MODULES[module], tmp_path, "unused")
        path.write_text(text[: len(text) // 2 + 7])
    with pytest.raises(SystemExit) as exit:
        importlib.import_module(module).main([str(path)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit.value.code == 2 and len(errors) == 1 and errors[0].startswith("error:"), errors
    assert path.name in errors[0], errors
