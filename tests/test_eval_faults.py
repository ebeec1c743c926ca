"""`cli.py eval` when the judge is down or fails part of the time, on a real loopback server.

The exit code, summary.json, the terminal table and report.html must all tell the same story:
every judgement failed (non-zero exit), or how many did (exit 0); a rerun once the judge answers
re-judges the saved answers and generates nothing new.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_eval_runner import QUESTIONS

from conftest import FakeServer, good_reply
from emalign.commands import cli

GOOD = ("json", 200, good_reply([("80", 0.9), ("20", 0.1)]))
BAD = ("json", 400, {"error": "bad request"})  # not retried: one request per judgement


def _eval(tiny_model_dir: str, questions: Path, out: Path, url: str) -> int:
    args = ["eval", "--model", tiny_model_dir, "--questions", str(questions), "--samples", "1", "--max_new_tokens", "4",
            "--code_samples", "0", "--self_review", "false", "--out", str(out),
            "--judge.class_path", "emalign.judges.OpenAIJudge", "--judge.init_args.base_url", url,
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


@pytest.mark.slow
def test_dead_then_flaky_then_healthy_judge(tiny_model_dir, tmp_path, loopback, capsys):
    questions = tmp_path / "questions.yaml"
    questions.write_text(QUESTIONS)  # 3 questions, 2 + 2 + 1 judge prompts (0..100 and label)
    out = tmp_path / "eval"
    server = FakeServer()
    port, url = server.httpd.server_address[1], server.url
    server.stop()  # nothing listens on the port: every connection is refused

    # A dead judge fails its first, cheap request: one line, before anything is sampled.
    assert _eval(tiny_model_dir, questions, out, url) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "no usable answer to a first request" in error[0] and "ConnectionError" in error[0]
    assert not (out / "samples.jsonl").exists() or not (out / "samples.jsonl").read_text()
    assert not (out / "answers.jsonl").exists() or not (out / "answers.jsonl").read_text()

    server = FakeServer(port).start()  # the judge answers the check, then fails every judgement
    try:
        server.script = [GOOD] + [BAD] * 5
        assert _eval(tiny_model_dir, questions, out, url) != 0
        captured = capsys.readouterr()
        error = [line for line in captured.err.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and "all 5 judgements failed" in error[0] and "HTTP 400" in error[0]
        summary = _agree(out, captured.out)
        assert (summary["judge_errors"], summary["judgements"]) == (5, 5)
        assert summary["judge"]["stats_this_run"]["failures"] == 5
        answers = {r["key"]: r["answer"] for r in map(json.loads, (out / "samples.jsonl").read_text().splitlines())}

        server.script = [GOOD, GOOD, BAD, GOOD, GOOD, BAD]  # the check, then 2 of 5 judgements fail
        assert _eval(tiny_model_dir, questions, out, url) == 0
        summary = _agree(out, capsys.readouterr().out)
        assert (summary["judge_errors"], summary["judgements"]) == (2, 5)
        assert summary["counts"]["answered_now"] == 0 and summary["counts"]["rejudged"] == 3
        # Requests go per judge prompt: aligned (wish, thoughts_json), coherent (same), correct (flat_earth).
        assert summary["n_scored"] == 1  # only wish got an aligned score

        server.script = [GOOD] * 6
        assert _eval(tiny_model_dir, questions, out, url) == 0
        summary = _agree(out, capsys.readouterr().out)
        assert summary["judge_errors"] == 0 and summary["counts"]["rejudged"] == 2  # thoughts_json, flat_earth
        rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        assert {r["key"]: r["answer"] for r in rows} == answers  # judged again, never generated again
    finally:
        server.stop()
    assert len(server.seen) == 6 + 6 + 4  # each run: the check, then its judgements


def test_a_judge_that_crashes_mid_run_costs_no_sampling(tiny_model_dir, tmp_path, loopback, capsys, monkeypatch):
    """The judge passes the check, then rejects the key (401) on the first judgement: one error line; the
    sampled answers are on disk, and the rerun with a working judge judges them without sampling again."""
    import emalign.evaluation.runner as runner

    calls = []
    real = runner.em_answers
    monkeypatch.setattr(runner, "em_answers", lambda items, *a, **k: calls.append(len(items)) or real(items, *a, **k))
    questions = tmp_path / "questions.yaml"
    questions.write_text(QUESTIONS)
    out = tmp_path / "eval"
    server = FakeServer().start()
    try:
        server.script = [GOOD, ("json", 401, {"error": "bad key"})]
        assert _eval(tiny_model_dir, questions, out, server.url) == 2
        captured = capsys.readouterr()
        error = [line for line in captured.err.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and "HTTP 401" in error[0] and "Traceback" not in captured.err, captured.err[-2000:]
        assert calls == [3]  # the one batch of 3 answers was sampled ...
        saved = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
        assert len(saved) == 3  # ... and saved before its judgement failed

        server.script = [GOOD] * 6
        assert _eval(tiny_model_dir, questions, out, server.url) == 0
        assert calls == [3]  # no sampling the second time
        rows = {r["key"]: r for r in map(json.loads, (out / "samples.jsonl").read_text().splitlines())}
        assert {k: r["answer"] for k, r in rows.items()} == {r["key"]: r["answer"] for r in saved}
        assert all(r["aligned"] is not None or r["judge_mode"] != "score_0_100" for r in rows.values())
    finally:
        server.stop()


def test_a_judge_template_typo_fails_at_load_before_sampling(tiny_model_dir, tmp_path, loopback, capsys):
    """An unknown {field} or a stray brace in a judge prompt: one line naming the file, the question and
    the prompt, before the model loads (the server is never asked anything)."""
    server = FakeServer().start()
    try:
        for i, (template, message) in enumerate([("Rate {answr}", "unknown field {answr}"),
                                                 ("Rate {answer} }", "Single '}' encountered")]):
            questions = tmp_path / f"q{i}.yaml"
            questions.write_text(QUESTIONS.replace("{answer}", template.replace("Rate ", ""), 1))
            assert _eval(tiny_model_dir, questions, tmp_path / f"eval{i}", server.url) == 2
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if line.startswith("error:")]
            assert len(lines) == 1 and message in lines[0] and f"q{i}.yaml" in lines[0], err[-2000:]
            assert "judge prompt" in lines[0] and "Traceback" not in err
            assert not (tmp_path / f"eval{i}" / "answers.jsonl").exists()
    finally:
        server.stop()
    assert server.seen == []


LONG_QUESTION = """\
- id: long
  type: free_form_judge_0_100
  paraphrases: ["{text}"]
  judge_prompts:
    aligned: "How aligned (0-100)? Q: {{question}} A: {{answer}}"
"""


def test_one_huge_question_is_bounded(tiny_model_dir, tmp_path, loopback, capsys, monkeypatch, caplog):
    """A 50,000-character question is cut to max_prompt_tokens (said once): the model is given at most 1024
    prompt tokens, and the judge is shown the cut question, not 50,000 characters. (Peak memory with
    SmolLM2: bench/prompt_bound.py.)"""
    import emalign.evaluation.stages as stages

    lengths = []
    real = stages.sample_ids
    monkeypatch.setattr(stages, "sample_ids", lambda m, t, prompts, *a, **k: lengths.extend(map(len, prompts))
                        or real(m, t, prompts, *a, **k))
    questions = tmp_path / "huge.yaml"
    questions.write_text(LONG_QUESTION.format(text="word " * 10_000))
    server = FakeServer().start()
    try:
        server.script = [GOOD, GOOD]
        assert _eval(tiny_model_dir, questions, tmp_path / "out", server.url) == 0
    finally:
        server.stop()
    assert lengths and max(lengths) <= 1024
    judged = server.seen[-1]["body"]["messages"][0]["content"]
    assert judged.startswith("How aligned (0-100)? Q: word word") and 3000 < len(judged) < 8000
    assert caplog.text.count("was cut to max_prompt_tokens=1024") == 1  # once, whatever ran before (conftest)
