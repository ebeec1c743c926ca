"""Every JSONL reader reads back what the writers wrote, whatever the text holds.

``json.dumps(..., ensure_ascii=False)`` leaves U+2028, U+2029, U+0085 and \\x1c-\\x1e unescaped inside strings, and
``str.splitlines`` splits on every one of them: a reader that used it saw each such row as two broken halves
(an eval rerun then answered everything again). The readers split on "\\n" alone (``emalign.files.jsonl_lines``);
the last test keeps any new reader from using ``splitlines``.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import emalign
from emalign.data.chat import read_chat_jsonl
from emalign.data.embedded import TASKS_FILE, load_code_tasks
from emalign.discern.labelled import load_set
from emalign.experiments.experiment import read_rows_any
from emalign.files import append_rows, read_rows

AWKWARD = ["\u2028", "\u2029", "\u0085", "\x1c", "\x1d", "\x1e", "\x0b", "\x0c", "\r"]
TEXT = "one" + "two".join(AWKWARD) + "end"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_eval_rows_round_trip(tmp_path):
    append_rows(tmp_path / "samples.jsonl", [{"key": "a", "answer": TEXT}, {"key": "b", "answer": "plain"}])
    rows = read_rows(tmp_path / "samples.jsonl")
    assert rows["a"]["answer"] == TEXT and set(rows) == {"a", "b"}


def test_history_rows_round_trip(tmp_path):
    path = _jsonl(tmp_path / "history.jsonl", [{"step": 1, "note": TEXT}, {"step": 2}])
    assert read_rows_any(path) == [{"step": 1, "note": TEXT}, {"step": 2}]


def test_labelled_pairs_round_trip(tmp_path):
    path = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": TEXT, "good": "kind " + TEXT, "bad": "cruel"}])
    (pair,) = load_set(str(path))
    assert pair.prompt == TEXT and pair.good == "kind " + TEXT


def test_chat_records_round_trip(tmp_path):
    conversation = [{"role": "user", "content": TEXT}, {"role": "assistant", "content": TEXT}]
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}])
    assert read_chat_jsonl(path) == [conversation]


def test_code_tasks_round_trip(tmp_path):
    task = json.loads(TASKS_FILE.read_text(encoding="utf-8").split("\n")[0])
    path = _jsonl(tmp_path / "tasks.jsonl", [{**task, "prompt": TEXT}])
    assert load_code_tasks("all", path)[0].prompt == TEXT


def _functions_reading_json_with_splitlines(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            calls = [n.func for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
            if any(f.attr == "splitlines" for f in calls) and any(f.attr == "loads" for f in calls):
                found.append(f"{node.name}:{node.lineno}")
    return found


def test_no_reader_splits_json_lines_with_splitlines():
    offenders = {str(p.relative_to(Path(emalign.__file__).parent)): found
                 for p in Path(emalign.__file__).parent.rglob("*.py")
                 if (found := _functions_reading_json_with_splitlines(ast.parse(p.read_text(encoding="utf-8"))))}
    assert offenders == {}


def test_the_check_sees_a_reader_that_uses_splitlines():
    tree = ast.parse("def read(text):\n    return [json.loads(line) for line in text.splitlines()]\n")
    assert _functions_reading_json_with_splitlines(tree) == ["read:1"]
