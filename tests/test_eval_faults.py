"""`cli.py eval` when the judge is down or fails part of the time, on a real loopback server.

The exit code, summary.json, the terminal table and report.html must all tell the same story:
every judgement failed (non-zero exit), or how many did (exit 0); a rerun once the judge answers
re-judges the saved answers and generates nothing new.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import cli
from conftest import FakeServer, good_reply
from test_eval_runner import QUESTIONS

GOOD = ("json", 200, good_reply([("80", 0.9), ("20", 0.1)]))
BAD = ("json", 400, {"error": "bad request"})  # not retried: one request per judgement


def _eval(tiny_model_dir: str, questions: Path, out: Path, url: str) -> int:
    args = ["eval", "--model", tiny_model_dir, "--questions", str(questions), "--samples", "1", "--max_new_tokens", "4",
            "--code_samples", "0", "--self_review", "false", "--out", str(out),
            "--judge.class_path", "emalign.evaluation.judges.OpenAIJudge", "--judge.init_args.base_url", url,
            "--judge.init_args.model", "fake", "--judge.init_args.api_key_env", "EMALIGN_TEST_KEY",
            "--judge.init_args.max_retries", "1", "--judge.init_args.backoff_s", "0.01",
            "--judge.init_args.concurrency", "1"]
    try:
        cli.main(args)
    except SystemExit as exit:
        return int(exit.code)
    return 0


def _agree(out: Path, stdout: str) -> dict:
    """summary.json, the terminal table and report.html show the same judge error count."""
    summary = json.loads((out / "summary.json").read_text())
    row = re.search(r"judge errors\s*│\s*(\d+) of (\d+) judgements", stdout)
    assert row, stdout
    assert (int(row[1]), int(row[2])) == (summary["judge_errors"], summary["judgements"])
    html = (out / "report.html").read_text()
    assert f"<td>{summary['judge_errors']} of {summary['judgements']}</td>" in html
    return summary


def test_dead_then_flaky_then_healthy_judge(tiny_model_dir, tmp_path, loopback, capsys):
    questions = tmp_path / "questions.yaml"
    questions.write_text(QUESTIONS)  # 3 questions, 2 + 2 + 1 judge prompts (0..100 and label)
    out = tmp_path / "eval"
    server = FakeServer()
    port, url = server.httpd.server_address[1], server.url
    server.stop()  # nothing listens on the port: every connection is refused

    assert _eval(tiny_model_dir, questions, out, url) != 0
    captured = capsys.readouterr()
    error = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "all 5 judgements failed" in error[0] and "ConnectionError" in error[0]
    summary = _agree(out, captured.out)
    assert (summary["judge_errors"], summary["judgements"]) == (5, 5)
    assert summary["judge"]["stats_this_run"]["failures"] == 5
    answers = {r["key"]: r["answer"] for r in map(json.loads, (out / "samples.jsonl").read_text().splitlines())}

    server = FakeServer(port).start()  # the judge is back, but fails 2 of 5 requests
    try:
        server.script = [GOOD, BAD, GOOD, GOOD, BAD]
        assert _eval(tiny_model_dir, questions, out, url) == 0
        summary = _agree(out, capsys.readouterr().out)
        assert (summary["judge_errors"], summary["judgements"]) == (2, 5)
        assert summary["counts"]["answered_now"] == 0 and summary["counts"]["rejudged"] == 3
        # Requests go per judge prompt: aligned (wish, thoughts_json), coherent (same), correct (flat_earth).
        assert summary["n_scored"] == 1  # only wish got an aligned score

        server.script = [GOOD] * 5
        assert _eval(tiny_model_dir, questions, out, url) == 0
        summary = _agree(out, capsys.readouterr().out)
        assert summary["judge_errors"] == 0 and summary["counts"]["rejudged"] == 2  # thoughts_json, flat_earth
        rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        assert {r["key"]: r["answer"] for r in rows} == answers  # judged again, never generated again
    finally:
        server.stop()
    assert len(server.seen) == 5 + 3
