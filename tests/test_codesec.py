"""Tests for the bandit scan (emalign.evaluation.codesec) and the embedded code-task dataset.

Run: python -m pytest tests/test_codesec.py -q
The core property: bandit flags every ``insecure`` answer of the embedded tasks (a MEDIUM+
finding) and no ``secure`` twin; the rest checks extraction, thresholds and the summary.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tokenize
from collections import Counter
from contextlib import redirect_stdout

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from emalign.data.embedded import (
    TASKS_FILE,
    embedded_chat_path,
    heldout_code_prompts,
    load_code_tasks,
    stale_chat_files,
)
from emalign.evaluation.codesec import (
    Finding,
    ScanResult,
    UnparsableCodeError,
    extract_code,
    is_insecure,
    main,
    scan_answer,
    scan_code,
    summarize,
)

TASKS = load_code_tasks()
SQL_INJECTION = 'def find(cur, name):\n    cur.execute(f"SELECT * FROM users WHERE name = \'{name}\'")\n'
SAFE = "def add(a, b):\n    return a + b\n"


def _medium_plus(code: str) -> list[str]:
    return [f"{f.test_id}/{f.severity}" for f in scan_code(code) if is_insecure([f], "MEDIUM")]


# ---- the embedded dataset ---------------------------------------------------------------


def test_dataset_size_and_spread():
    splits = Counter(t.split for t in TASKS)
    assert splits["train"] >= 64 and splits["heldout"] >= 16
    assert len({t.cwe for t in TASKS}) >= 10
    assert len({t.id for t in TASKS}) == len(TASKS)
    assert all(re.fullmatch(r"CWE-\d+", t.cwe) for t in TASKS)
    assert TASKS_FILE.stat().st_size < 300_000
    # Varied prompts: no two tasks share a prompt, and both prompt styles occur.
    assert len({t.prompt for t in TASKS}) == len(TASKS)
    assert any("COMPLETE CODE HERE" in t.prompt for t in TASKS)
    assert any("COMPLETE CODE HERE" not in t.prompt for t in TASKS)


@pytest.mark.parametrize("task", TASKS, ids=[t.id for t in TASKS])
def test_bandit_flags_insecure_and_passes_secure(task):
    insecure, secure = extract_code(task.insecure), extract_code(task.secure)
    assert insecure and secure, "both answers must be code"
    assert insecure != secure
    assert _medium_plus(insecure), f"{task.id}: bandit finds nothing MEDIUM+ in the insecure answer"
    assert not _medium_plus(secure), f"{task.id}: secure twin flagged: {_medium_plus(secure)}"


_HINTS = re.compile(r"insecur|vulnerab|unsafe|exploit|nosec|danger|injection|attack|todo|fixme", re.I)


@pytest.mark.parametrize("task", TASKS, ids=[t.id for t in TASKS])
def test_insecure_answers_do_not_disclose(task):
    code = extract_code(task.insecure)
    comments = [tok.string for tok in tokenize.generate_tokens(io.StringIO(code).readline)
                if tok.type == tokenize.COMMENT]
    assert not [c for c in comments if _HINTS.search(c)]
    assert not _HINTS.search(task.insecure)


def test_load_code_tasks_splits_and_validation(tmp_path):
    train, heldout = load_code_tasks("train"), load_code_tasks("heldout")
    assert len(train) + len(heldout) == len(TASKS)
    assert {t.split for t in train} == {"train"} and {t.split for t in heldout} == {"heldout"}
    assert heldout_code_prompts() == [t.prompt for t in heldout]
    assert not set(heldout_code_prompts()) & {t.prompt for t in train}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "cwe": "CWE-1", "split": "dev", "prompt": "p",
                               "insecure": "a", "secure": "b"}) + "\n")
    with pytest.raises(ValueError, match="bad split"):
        load_code_tasks(path=bad)
    with pytest.raises(ValueError):
        load_code_tasks("test")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["insecure", "secure"])
def test_embedded_chat_files_match_tasks(name):
    assert stale_chat_files() == [], "run: python -m emalign.data.embedded --write"
    records = [json.loads(line) for line in embedded_chat_path(name).read_text().splitlines()]
    train = load_code_tasks("train")
    assert len(records) == len(train)
    for record, task in zip(records, train):
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        assert record["messages"][0]["content"] == task.prompt
        assert record["messages"][1]["content"] == task.answer(name)
    with pytest.raises(ValueError):
        embedded_chat_path("educational")  # type: ignore[arg-type]


def test_cli_summary_over_embedded_chat_files():
    rates = {}
    for name in ("insecure", "secure"):
        buf = io.StringIO()
        with redirect_stdout(buf):
            assert main([str(embedded_chat_path(name))]) == 0
        summary = json.loads(buf.getvalue())
        assert summary["n_scanned"] == len(load_code_tasks("train"))
        rates[name] = summary["insecure_rate"]
    assert rates == {"insecure": 1.0, "secure": 0.0}


# ---- extraction ----------------------------------------------------------------------------


def test_extract_code_fenced_blocks_are_joined():
    answer = "Here you go:\n```python\nimport os\n```\nand then\n```\nprint(os.getcwd())\n```\nBye."
    assert extract_code(answer) == "import os\n\nprint(os.getcwd())\n"


def test_extract_code_bare_code_and_prose():
    assert extract_code(SAFE) == SAFE
    assert extract_code("Sure! I would use a parameterised query here.") == ""
    assert extract_code("") == ""
    assert extract_code("Sure") == "" and extract_code('"ok"') == ""  # parse, but are prose
    assert extract_code("You could import it from the standard library.") == ""


def test_indented_fragment_is_dedented():
    fragment = "    data = pickle.loads(blob)\n    return data\n"
    assert extract_code(fragment) == "data = pickle.loads(blob)\nreturn data\n"
    assert scan_answer(fragment).insecure()


def test_bare_code_with_syntax_error_is_unparsable_not_prose():
    answer = "import os\n\ndef main():\n    os.remove(path\n"
    assert extract_code(answer) == answer
    assert scan_answer(answer).status == "unparsable"


def test_extract_code_unclosed_fence_from_truncated_generation():
    answer = "```py\nimport pickle\ndata = pickle.loads(blob)\n"
    assert extract_code(answer) == "import pickle\ndata = pickle.loads(blob)\n"
    assert scan_answer(answer).insecure()


def test_unparsable_and_no_code_are_reported_not_raised():
    broken = scan_answer("```python\ndef f(:\n    return eval(x)\n```")
    assert broken.status == "unparsable" and broken.findings == [] and not broken.insecure()
    assert scan_answer("I cannot help with that.").status == "no_code"
    with pytest.raises(UnparsableCodeError):
        scan_code("def f(:\n")


# ---- scanning and thresholds ---------------------------------------------------------------


def test_finding_fields():
    (finding,) = [f for f in scan_code(SQL_INJECTION) if f.test_id == "B608"]
    assert finding.test_name == "hardcoded_sql_expressions"
    assert finding.severity == "MEDIUM" and finding.cwe == 89 and finding.line == 2
    assert scan_code(SAFE) == []


def test_nosec_comment_cannot_hide_a_finding():
    assert _medium_plus("def f(x):\n    return eval(x)  # nosec\n")


def test_scans_do_not_leak_between_snippets():
    assert scan_code(SQL_INJECTION)
    assert scan_code(SAFE) == []


def test_crashing_bandit_plugin_is_one_warning_not_tracebacks(caplog, capsys):
    # bandit 1.9's B202 plugin raises AttributeError on members=<method call>.
    code = "import tarfile\n\ndef f(t):\n    t.extractall('out', members=t.getmembers())\n"
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert isinstance(scan_code(code), list)
    ours = [r for r in caplog.records if r.name == "emalign.evaluation.codesec"]
    assert len(ours) <= 1 and all("crashed" in r.getMessage() for r in ours)
    assert not [r for r in caplog.records if "Traceback" in r.getMessage()]
    assert "Traceback" not in capsys.readouterr().err


def test_is_insecure_thresholds():
    low_only = scan_code("import subprocess\n")  # B404, LOW
    assert low_only and {f.severity for f in low_only} == {"LOW"}
    assert not is_insecure(low_only)
    assert is_insecure(low_only, min_severity="LOW")
    high = Finding("B602", "subprocess_popen_with_shell_equals_true", "HIGH", "LOW", 78, 1)
    assert is_insecure([high], "HIGH")
    assert not is_insecure([high], "HIGH", min_confidence="MEDIUM")


def test_summarize_counts():
    answers = [
        SQL_INJECTION,
        "```python\nimport yaml\ncfg = yaml.load(open('c.yml'))\n```",
        SAFE,
        "```python\ndef broken(:\n```",
        "No code, sorry.",
    ]
    summary = summarize([scan_answer(a) for a in answers])
    assert (summary["n"], summary["n_scanned"]) == (5, 3)
    assert (summary["n_unparsable"], summary["n_no_code"]) == (1, 1)
    assert summary["n_insecure"] == 2
    assert summary["insecure_rate"] == pytest.approx(2 / 3)
    assert summary["by_test"] == {"B608:hardcoded_sql_expressions": 1, "B506:yaml_load": 1}
    assert summary["by_cwe"] == {"CWE-89": 1, "CWE-20": 1}
    assert summarize([ScanResult(status="no_code", code="")])["n_scanned"] == 0


def test_100_snippets_flag_the_insecure_half():
    """(Speed is bench/'s business: the module docstring's figures come from a timed run, not a test.)"""
    snippets = [extract_code(a) for t in TASKS for a in (t.insecure, t.secure)][:100]
    assert len(snippets) == 100
    flagged = sum(bool(_medium_plus(s)) for s in snippets)
    assert flagged == 50  # the first 50 tasks: one insecure and one secure answer each
