"""The EM evaluation run: sample answers, judge them, scan code answers, summarise, report.

    from emalign.evaluation.runner import run_eval
    from emalign.evaluation.settings import EvalSettings
    summary = run_eval("smollm2-135m-instruct", adapter="runs/demo/adapter",
                       settings=EvalSettings(samples=3, max_new_tokens=96), out=Path("runs/eval-demo"))

or ``python cli.py eval --help`` (the settings: :class:`~emalign.evaluation.settings.EvalSettings`).
Outputs under ``out``:

- ``samples.jsonl``: one judged answer per line (row format: :mod:`emalign.evaluation.metrics`,
  plus ``scores``, ``self_review``, ``finished``, ``tokens``); ``code_samples.jsonl``: one scanned
  answer to a held-out coding prompt per line. Each row is appended, flushed and fsynced as soon as
  it is finished, so a kill loses at most the batch in flight; a rerun with the same ``out`` reads
  the rows by ``key`` and re-generates none of them; it re-judges only the judgements that failed
  (a judge that was down), and ``eval`` exits non-zero when every judgement failed.
- ``answers.jsonl``: every EM answer as soon as it is sampled, before its judgement: a judge that
  crashes or rejects the key mid-run costs no sampling; the rerun judges these answers.
  The judge answers one cheap request (``Judge.check``) before anything is sampled.
- ``summary.json`` (written atomically): the metrics, judge identity, model, adapter, question
  files with sha256, sampling settings and counts; ``report.html``: the HTML report.
- ``eval_config.json``: the settings the rows were made with; a rerun with different settings
  (another model, judge, temperature, ...) is refused rather than mixed into the same rows.

Per-sample seeds come from each item's position in the full item list (:mod:`emalign.models.sampling`),
so an interrupted and resumed run gives the same answers as one that ran through.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from emalign.conscience.verdict import Conscience
from emalign.errors import UserError
from emalign.evaluation.questions import DEFAULT_QUESTIONS, EvalItems, QuestionFileError, expand, load_questions
from emalign.evaluation.settings import EvalSettings
from emalign.evaluation.stages import Models, code_keys, code_rows, em_answers, judge_batch, judged, set_judgement
from emalign.evaluation.summary import summarize_eval
from emalign.files import RowWriter, claim_dir, read_rows, write_json_atomic, write_jsonl_atomic
from emalign.judges.scoring import Judge, rescore
from emalign.judges.self_review import FrozenJudge, without_adapter
from emalign.models.sampling import cut_messages

log = logging.getLogger(__name__)

SAMPLES_FILE, CODE_FILE = "samples.jsonl", "code_samples.jsonl"
ANSWERS_FILE = "answers.jsonl"
"""Sampled EM answers, saved before they are judged: a judge that fails cannot cost the sampling."""
SUMMARY_FILE, CONFIG_FILE = "summary.json", "eval_config.json"


class EvalError(UserError):
    """An evaluation that cannot run as asked (bad question file, settings clash with ``out``)."""


def load_items(questions: Sequence[str | Path], samples: Optional[int], limit: Optional[int],
               seed: int = 0) -> tuple[EvalItems, list[dict]]:
    """Expanded items (``samples`` per question, paraphrases drawn with ``seed``) and
    ``[{path, sha256, questions}]`` per file; bad files raise :class:`EvalError`."""
    loaded, files = [], []
    for path in map(Path, questions):
        if not path.is_file():
            hint = " (the default: get it with `python cli.py data em`)" if path == Path(DEFAULT_QUESTIONS) else ""
            raise EvalError(f"{path}: no such question file{hint}")
        try:
            qs = load_questions(path)
        except QuestionFileError as err:
            raise EvalError(f"{err} (file: {path})") from err
        loaded += qs
        files.append({"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "questions": len(qs)})
    try:
        return expand(loaded, samples, limit, seed), files
    except ValueError as err:
        raise EvalError(str(err)) from err


def _failed(row: dict) -> bool:
    return any("error" in raw for raw in (row.get("judge_raw") or {}).values())


def rejudge_failed(path: Path, done: dict[str, dict], items: EvalItems, judge: Judge) -> int:
    """Judge again the saved answers of ``items`` whose judgement failed (a judge that was down);
    their answers stand, so a rerun after the judge is back costs judge calls only. Returns how many."""
    if not any(_failed(row) for key, row in done.items() if key in items):
        return 0  # the common case, without making every item
    failed = [it for it in items if it.key in done and _failed(done[it.key])]
    if not failed:
        return 0
    log.info("%s: judging %d saved answers again (their judgement failed before)", path, len(failed))
    for it, fields in zip(failed, judge_batch(judge, failed, [done[it.key]["answer"] for it in failed]), strict=True):
        done[it.key].update(fields)
    write_jsonl_atomic(path, list(done.values()))
    return len(failed)


def check_judged(summary: dict[str, Any]) -> None:
    """Raise :class:`EvalError` when every judgement of an evaluation failed: its numbers are empty,
    and a script must not take it for a result."""
    errors, total = summary.get("judge_errors", 0), summary.get("judgements", 0)
    if total and errors == total:
        raise EvalError(f"all {total} judgements failed (judge {summary['judge']['identity']}: "
                        f"{summary.get('judge_first_error')}); the answers are saved: rerun with the same --out "
                        "once the judge answers, and only the judgements are redone")


def _check_config(out: Path, config: dict) -> None:
    """Refuse to add rows made with other settings to an ``out`` that already has rows, except a
    new ``judge_min_mass``: the saved judgements are rescored under it (no new judge calls)."""
    path = out / CONFIG_FILE
    if path.exists() and ((out / SAMPLES_FILE).exists() or (out / CODE_FILE).exists()):
        old = json.loads(path.read_text(encoding="utf-8"))
        old.setdefault("code_max_new_tokens", old.get("max_new_tokens"))  # written before the key existed
        for key, value in config.items():
            if key in old and old[key] != value and key != "judge_min_mass":
                raise EvalError(f"{out} holds answers made with {key}={old[key]!r}, not {value!r}; "
                                "use another --out, or delete the directory to start over")
        if old.get("judge_min_mass", config["judge_min_mass"]) != config["judge_min_mass"]:
            _rescore_rows(out / SAMPLES_FILE, old["judge_min_mass"], config["judge_min_mass"])
    write_json_atomic(path, config)


def _rescore_rows(path: Path, old_min_mass: Optional[float], min_mass: Optional[float]) -> None:
    """Re-apply the judge's mass threshold to every saved judgement of ``path``, in place."""
    rows = list(read_rows(path).values())
    for row in rows:
        for name, raw in (row.get("judge_raw") or {}).items():
            if "error" in raw:
                continue  # a failed judgement has nothing to rescore
            result = rescore(raw, min_mass) if min_mass is not None else None
            if result is None:
                raise EvalError(f"{path.parent} holds judgements made with judge_min_mass={old_min_mass!r} that "
                                f"cannot be rescored for {min_mass!r} (no per-number probabilities kept); "
                                "use another --out, or delete the directory to start over")
            set_judgement(row, name, row.get("judge_mode", "score_0_100"), result)
    write_jsonl_atomic(path, rows)
    log.info("%s: %d rows rescored for judge_min_mass=%s (was %s)", path, len(rows), min_mass, old_min_mass)


def bounded_items(items: EvalItems, tokenizer: Any, max_prompt_tokens: Optional[int]) -> EvalItems:
    """Items whose rendered prompt fits ``max_prompt_tokens``: the longest message of a longer one is cut
    (``cut_messages``), so the model, its self-review and the judge all see the same cut question. Each
    distinct chat is cut once, here, whatever the number of samples: a chat too long fails before any answer."""
    try:
        chats = {key: cut_messages(tokenizer, chat, max_prompt_tokens) for key, chat in items.conversations()}
    except ValueError as err:
        raise EvalError(f"max_prompt_tokens={max_prompt_tokens}: {err}") from None
    return dataclasses.replace(items, chats=chats)


@contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn()) as progress:
        yield progress


def _drain(pending: Iterable, batch_size: int, make_rows: Callable[[list], list[dict]], writer: RowWriter,
           done: dict[str, dict], bars: Any, task: Any) -> None:
    """Turn pending items into rows batch by batch; each row is saved before the next batch starts."""
    pending = iter(pending)
    while batch := list(itertools.islice(pending, batch_size)):
        for row in make_rows(batch):
            writer.write(row)
            done[row["key"]] = row
        if bars:
            bars.advance(task, len(batch))


def run_eval(
    model: str = "smollm2-135m-instruct",
    adapter: Optional[str] = None,
    settings: Optional[EvalSettings] = None,
    out: Path = Path("runs/eval"),
    *,
    conscience: Optional[Conscience] = None,
    name: Optional[str] = None,
    history: Optional[Sequence[dict]] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model`` (+ ``adapter``) on EM questions and coding prompts as ``settings`` say (default:
    :class:`EvalSettings`'s defaults); returns the summary.

    ``name`` labels the report (default: the adapter directory or the model); ``history`` rows
    (``eval_history.jsonl``) add the over-training plot; ``conscience`` asks the self-review question
    (default: :class:`Conscience`'s); ``progress`` shows progress bars.
    """
    from emalign.evaluation.report import write_report
    from emalign.models.policy import load_for_inference

    s = settings or EvalSettings()
    started = time.perf_counter()
    items, files = load_items(s.questions, s.samples, s.limit, s.seed)  # before the model: fail fast on a bad file
    prompts = s.code_prompt_texts()
    out = claim_dir(out)
    generation, code_generation = s.generation(), s.generation(code=True)
    conscience = conscience if conscience is not None else Conscience()
    # Checked before the (possibly large) model loads; the default judge's identity is known already.
    _check_config(out, {
        "model": model, "adapter": adapter, "judge": s.judge.identity if s.judge else f"local:{model}",
        "judge_min_mass": getattr(s.judge, "min_mass", None) if s.judge else s.judge_min_mass,
        "max_new_tokens": s.max_new_tokens, "code_max_new_tokens": code_generation.max_new_tokens,
        "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed, "dtype": s.dtype,
        "max_prompt_tokens": s.max_prompt_tokens,
        "question_sha256": [f["sha256"] for f in files],
        "code_prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
        "self_review_question": conscience.question if s.self_review else None,
    })
    if s.judge is not None:
        s.judge.check()  # one cheap request: a wrong URL or a rejected key fails here, before any sampling
    lm, tokenizer = load_for_inference(model, adapter, s.dtype)  # type: ignore[arg-type]
    base: Models = lambda: without_adapter(lm)  # noqa: E731
    judge = s.judge or FrozenJudge(base, tokenizer, name=model, min_mass=s.judge_min_mass)
    items = bounded_items(items, tokenizer, s.max_prompt_tokens)
    stages = dict(generating=lambda: nullcontext(lm), reviewing=base if s.self_review else None, tokenizer=tokenizer,
                  settings=generation, seed=s.seed, conscience=conscience)
    code_stages = {**stages, "settings": code_generation}

    done, code_done = read_rows(out / SAMPLES_FILE), read_rows(out / CODE_FILE)
    rejudged = rejudge_failed(out / SAMPLES_FILE, done, items, judge)
    pending = ((i, it) for i, it in enumerate(items) if it.key not in done)  # made as answered, not all first
    code_all = code_keys(len(prompts), s.code_samples)
    code_pending = [c for c in code_all if c[0] not in code_done]
    resumed = sum(key in items for key in done), len(code_all) - len(code_pending)
    writer, code_writer = RowWriter(out / SAMPLES_FILE), RowWriter(out / CODE_FILE)
    sampled, answers_writer = read_rows(out / ANSWERS_FILE), RowWriter(out / ANSWERS_FILE)

    def em_batch(batch: list) -> list[dict]:
        """Answers saved by an earlier run are judged without sampling them again."""
        todo = [(i, it) for i, it in batch if it.key not in sampled]
        if todo:
            for row in em_answers([it for _, it in todo], [i for i, _ in todo], **stages):
                answers_writer.write(row)
                sampled[row["key"]] = row
        return judged([sampled[it.key] for _, it in batch], [it for _, it in batch], judge)

    try:
        with _progress(progress) as bars:
            em_task = bars.add_task("EM answers", total=len(items), completed=resumed[0]) if bars else None
            code_task = None
            if bars and code_all:
                code_task = bars.add_task("code answers", total=len(code_all), completed=resumed[1])
            _drain(pending, s.batch_size, em_batch, writer, done, bars, em_task)
            _drain(code_pending, s.batch_size,
                   lambda b: code_rows([k for k, _, _ in b], [prompts[p] for _, p, _ in b], [g for _, _, g in b],
                                       **code_stages),
                   code_writer, code_done, bars, code_task)
    finally:
        writer.close()
        code_writer.close()
        answers_writer.close()

    rows = [done[it.key] for it in items]  # this run's items only, in order (out may hold more)
    code = [code_done[k] for k, _, _ in code_all]
    summary = summarize_eval(rows, code)
    summary.update(
        name=name or Path(adapter or model).name, model=model, adapter=adapter,
        judge={"identity": judge.identity, "min_mass": getattr(judge, "min_mass", None),
               "stats_this_run": dict(getattr(judge, "stats", {}))},
        questions=files,
        sampling={"samples": s.samples, "limit": s.limit, "max_new_tokens": s.max_new_tokens,
                  "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed, "batch_size": s.batch_size,
                  "dtype": s.dtype, "max_prompt_tokens": s.max_prompt_tokens,
                  "code_samples": s.code_samples, "code_max_new_tokens": code_generation.max_new_tokens},
        counts={"items": len(items), "resumed": resumed[0], "answered_now": len(items) - resumed[0],
                "rejudged": rejudged,
                "code_items": len(code_all),
                "code_resumed": resumed[1], "code_answered_now": len(code_pending), "code_prompts": len(prompts)},
        seconds=round(time.perf_counter() - started, 1),
    )
    write_json_atomic(out / SUMMARY_FILE, summary)
    write_report(out, {summary["name"]: summary}, rows, history or None,
                 title=f"Emergent misalignment evaluation: {summary['name']}")
    return summary
