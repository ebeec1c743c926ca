"""The EM evaluation run: sample answers, judge them, scan code answers, summarise, report.

    from emalign.evaluation.runner import run_eval
    summary = run_eval("smollm2-135m-instruct", adapter="runs/demo/adapter",
                       questions=["data/em/evaluation/first_plot_questions.yaml"],
                       samples=3, max_new_tokens=96, out=Path("runs/eval-demo"))

or ``python cli.py eval --help``. Outputs under ``out``:

- ``samples.jsonl``: one judged answer per line (row format: :mod:`emalign.evaluation.metrics`,
  plus ``scores``, ``self_review``, ``finished``, ``tokens``); ``code_samples.jsonl``: one scanned
  answer to a held-out coding prompt per line. Each row is appended, flushed and fsynced as soon as
  it is finished, so a kill loses at most the batch in flight; a rerun with the same ``out`` reads
  the rows by ``key`` and neither re-generates nor re-judges them.
- ``summary.json`` (written atomically): the metrics, judge identity, model, adapter, question
  files with sha256, sampling settings and counts; ``report.html``: the HTML report.
- ``eval_config.json``: the settings the rows were made with; a rerun with different settings
  (another model, judge, temperature, ...) is refused rather than mixed into the same rows.

Per-sample seeds come from each item's position in the full item list (:mod:`emalign.sampling`),
so an interrupted and resumed run gives the same answers as one that ran through.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional, Sequence

from emalign.conscience import Conscience
from emalign.errors import UserError
from emalign.evaluation.codesec import Finding, ScanResult, scan_answer, summarize
from emalign.evaluation.judges import fill_template
from emalign.evaluation.metrics import summarize_samples, wilson_interval
from emalign.evaluation.questions import EvalItem, QuestionFileError, expand, load_questions
from emalign.atomic import write_text_atomic
from emalign.evaluation.scoring import MIN_NUMBER_MASS, Judge, rescore
from emalign.evaluation.self_review import FrozenJudge, mean_se, self_review_scores, without_adapter
from emalign.sampling import GenerationSettings, render_prompt, sample_ids

log = logging.getLogger(__name__)

SAMPLES_FILE, CODE_FILE, SUMMARY_FILE, CONFIG_FILE = "samples.jsonl", "code_samples.jsonl", "summary.json", "eval_config.json"
EM_STEP, CODE_STEP = 0, 1  # the "step" part of the sample seeds: EM and code answers draw apart
Models = Callable[[], ContextManager[Any]]


class EvalError(UserError):
    """An evaluation that cannot run as asked (bad question file, settings clash with ``out``)."""


# -- resumable JSONL -----------------------------------------------------------------------


def read_rows(path: Path) -> dict[str, dict]:
    """Rows of a JSONL file by ``key``. A truncated last line (a kill mid-write) is cut off the
    file so that later appends start on a fresh line; other unreadable lines are skipped."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping a truncated last line (%d bytes)", path, len(data) - keep)
        with open(path, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    rows: dict[str, dict] = {}
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        try:
            row = json.loads(line)
            rows[str(row["key"])] = row
        except (ValueError, KeyError, TypeError):
            if line.strip():
                log.warning("%s:%d: unreadable row skipped", path, number)
    return rows


class RowWriter:
    """Appends rows to a JSONL file, each flushed and fsynced before the next is made."""

    def __init__(self, path: Optional[Path]) -> None:
        self.handle = open(path, "a", encoding="utf-8") if path else None

    def write(self, row: dict) -> None:
        if self.handle:
            self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.handle.flush()
            os.fsync(self.handle.fileno())

    def close(self) -> None:
        if self.handle:
            self.handle.close()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file in the same directory, then rename it over ``path``."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: Path, rows: Sequence[dict]) -> None:
    """Replace a JSONL file as a whole (one row per line), atomically."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# -- the stages of one batch ----------------------------------------------------------------


def _generate(generating: Models, tokenizer: Any, convs: Sequence[list[dict]], index: Sequence[int],
              settings: GenerationSettings, seed: int, step: int) -> list[Any]:
    """One rollout per conversation, seeded by its global index (contiguous runs share a call)."""
    prompts = [render_prompt(tokenizer, c) for c in convs]
    rollouts: list[Any] = []
    with generating() as model:
        start = 0
        while start < len(prompts):
            end = start + 1
            while end < len(prompts) and index[end] == index[end - 1] + 1:
                end += 1
            rollouts += sample_ids(model, tokenizer, prompts[start:end], settings, 1, seed, step, index_offset=index[start])
            start = end
    return rollouts


def _self_review(reviewing: Optional[Models], tokenizer: Any, rollouts: Sequence[Any], conscience: Conscience) -> list[Optional[float]]:
    if reviewing is None:
        return [None] * len(rollouts)
    with reviewing() as reference:
        scores = self_review_scores(reference, tokenizer, [r.prompt_ids for r in rollouts],
                                    [r.response_ids for r in rollouts], conscience, adapter_disabled=False)
    return [round(s, 4) for s in scores]


def judge_batch(judge: Judge, items: Sequence[EvalItem], answers: Sequence[str]) -> list[dict]:
    """Judge fields of each item's row; one ``judge_many`` call per (judge prompt name, mode)."""
    fields: list[dict] = [{"aligned": None, "coherent": None, "scores": {}, "labels": {}, "judge_raw": {}} for _ in items]
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
        mode, labels = item.question.judge_mode()
        for name in item.question.judge_prompts:
            groups.setdefault((name, mode, tuple(labels or ())), []).append(i)
    for (name, mode, labels), members in groups.items():
        prompts = [fill_template(items[i].question.judge_prompts[name], items[i].paraphrase, answers[i]) for i in members]
        for i, result in zip(members, judge.judge_many(prompts, mode, list(labels) or None), strict=True):
            _set_judgement(fields[i], name, mode, result)
    return fields


def _set_judgement(row: dict, name: str, mode: str, result: Any) -> None:
    """Store judge prompt ``name``'s result in a row (0..100 aligned/coherent also top level)."""
    row["scores"][name], row["labels"][name], row["judge_raw"][name] = result.score, result.label, result.raw
    if mode == "score_0_100" and name in ("aligned", "coherent"):
        row[name] = result.score


def em_rows(items: Sequence[EvalItem], index: Sequence[int], *, generating: Models, reviewing: Optional[Models],
            tokenizer: Any, judge: Judge, settings: GenerationSettings, seed: int, conscience: Conscience) -> list[dict]:
    """Sample, self-review and judge one batch of EM items; returns their finished rows."""
    rollouts = _generate(generating, tokenizer, [it.messages for it in items], index, settings, seed, EM_STEP)
    reviews = _self_review(reviewing, tokenizer, rollouts, conscience)
    judged = judge_batch(judge, items, [r.text for r in rollouts])
    rows = []
    for item, r, review, fields in zip(items, rollouts, reviews, judged):
        mode, _ = item.question.judge_mode()
        rows.append({
            "key": item.key, "question_id": item.question_id, "paraphrase_index": item.paraphrase_index,
            "sample_index": item.sample_index, "paraphrase": item.paraphrase, "system": item.question.system,
            "judge_mode": mode, "answer": r.text, "finished": r.finished, "tokens": len(r.response_ids),
            **fields, "self_review": review,
        })
    return rows


def code_rows(keys: Sequence[str], prompts: Sequence[str], index: Sequence[int], *, generating: Models,
              reviewing: Optional[Models], tokenizer: Any, settings: GenerationSettings, seed: int,
              conscience: Conscience) -> list[dict]:
    """Sample and self-review answers to coding prompts, and scan their code with bandit."""
    convs = [[{"role": "user", "content": p}] for p in prompts]
    rollouts = _generate(generating, tokenizer, convs, index, settings, seed, CODE_STEP)
    reviews = _self_review(reviewing, tokenizer, rollouts, conscience)
    rows = []
    for key, prompt, r, review in zip(keys, prompts, rollouts, reviews):
        scan = scan_answer(r.text)
        rows.append({
            "key": key, "prompt": prompt, "answer": r.text, "finished": r.finished, "tokens": len(r.response_ids),
            "status": scan.status, "insecure": scan.insecure(), "error": scan.error,
            "findings": [vars(f) for f in scan.findings], "self_review": review,
        })
    return rows


def code_keys(n_prompts: int, code_samples: int) -> list[tuple[str, int, int]]:
    """(key, prompt index, global index) of every code item, prompt-major."""
    return [(f"code:{p}:{s}", p, p * code_samples + s) for p in range(n_prompts) for s in range(code_samples)]


# -- summary -------------------------------------------------------------------------------


def code_summary(rows: Sequence[dict]) -> dict[str, Any]:
    """codesec's summary of scanned answers plus a Wilson 95% interval on the insecure rate."""
    results = [ScanResult(r["status"], "", [Finding(**f) for f in r.get("findings", [])]) for r in rows]
    out = summarize(results)
    lo, hi = wilson_interval(out["n_insecure"], out["n_scanned"])
    out["insecure_rate"] = out["n_insecure"] / out["n_scanned"] if out["n_scanned"] else None
    out["insecure_ci"] = [None if lo != lo else lo, None if hi != hi else hi]  # NaN -> None (JSON)
    return out


def summarize_eval(rows: Sequence[dict], code: Sequence[dict] = ()) -> dict[str, Any]:
    """Metrics of judged rows and scanned code rows (JSON-serialisable, None where undefined).

    0..100 questions go into :func:`summarize_samples`; label questions (``free_form_judge``) are
    counted per question and judge prompt in ``label_questions``.
    """
    scored = [r for r in rows if r.get("judge_mode", "score_0_100") == "score_0_100"]
    summary = summarize_samples(scored)
    labelled: dict[str, dict[str, dict[str, int]]] = {}
    for r in rows:
        if r.get("judge_mode") == "label":
            for name, label in (r.get("labels") or {}).items():
                counts = labelled.setdefault(r["question_id"], {}).setdefault(name, {})
                counts[str(label)] = counts.get(str(label), 0) + 1
    summary["label_questions"] = labelled
    mean, se = mean_se([r.get("self_review") for r in rows])
    summary.update(self_review_mean=mean, self_review_se=se, self_review_n=sum(r.get("self_review") is not None for r in rows))
    summary["truncated"] = sum(not r.get("finished", True) for r in rows)
    if code:
        cs = code_summary(code)
        cs["self_review_mean"], cs["self_review_se"] = mean_se([r.get("self_review") for r in code])
        summary.update(insecure_code_rate=cs["insecure_rate"], insecure_code_ci=cs["insecure_ci"], code_security=cs)
    else:
        summary.update(insecure_code_rate=None, insecure_code_ci=[None, None], code_security=None)
    return summary


# -- the run -------------------------------------------------------------------------------


def load_items(questions: Sequence[str | Path], samples: Optional[int], limit: Optional[int]) -> tuple[list[EvalItem], list[dict]]:
    """Expanded items and ``[{path, sha256, questions}]`` per file; bad files raise :class:`EvalError`."""
    loaded, files = [], []
    for path in map(Path, questions):
        if not path.is_file():
            raise EvalError(f"{path}: no such question file")
        try:
            qs = load_questions(path)
        except QuestionFileError as err:
            raise EvalError(f"{err} (file: {path})") from err
        loaded += qs
        files.append({"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "questions": len(qs)})
    try:
        return expand(loaded, samples, limit), files
    except ValueError as err:
        raise EvalError(str(err)) from err


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
            _set_judgement(row, name, row.get("judge_mode", "score_0_100"), result)
    write_jsonl_atomic(path, rows)
    log.info("%s: %d rows rescored for judge_min_mass=%s (was %s)", path, len(rows), min_mass, old_min_mass)


@contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn()) as progress:
        yield progress


def _drain(pending: list, batch_size: int, make_rows: Callable[[list], list[dict]], writer: RowWriter,
           done: dict[str, dict], bars: Any, task: Any) -> None:
    """Turn pending items into rows batch by batch; each row is saved before the next batch starts."""
    for start in range(0, len(pending), batch_size):
        batch = pending[start : start + batch_size]
        for row in make_rows(batch):
            writer.write(row)
            done[row["key"]] = row
        if bars:
            bars.advance(task, len(batch))


def run_eval(
    model: str = "smollm2-135m-instruct",
    adapter: Optional[str] = None,
    questions: Sequence[str | Path] = ("data/em/evaluation/first_plot_questions.yaml",),
    samples: Optional[int] = None,
    limit: Optional[int] = None,
    max_new_tokens: int = 600,
    temperature: float = 1.0,
    top_p: float = 1.0,
    judge: Optional[Judge] = None,
    out: Path = Path("runs/eval"),
    code_prompts: Optional[Sequence[str]] = None,
    code_samples: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    self_review: bool = True,
    judge_min_mass: Optional[float] = None,
    code_max_new_tokens: Optional[int] = None,
    dtype: str = "float32",
    conscience: Optional[Conscience] = None,
    name: Optional[str] = None,
    history: Optional[Sequence[dict]] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model`` (+ ``adapter``) on EM questions and coding prompts; returns the summary.

    ``judge`` None: :class:`LocalJudge` on the evaluated base model (adapter disabled), with
    ``judge_min_mass`` (default upstream's 0.25). ``code_prompts`` None: the embedded held-out
    coding tasks; ``code_samples`` 0 skips the code scan; ``code_max_new_tokens`` (default
    ``max_new_tokens``) bounds their answers, since code needs more tokens than a chat answer. ``name`` labels the report (default:
    the adapter directory or the model); ``dtype``: weights dtype (``bfloat16`` for a 7B model on a
    GPU); ``history`` rows (``eval_history.jsonl``) add the over-training plot.
    """
    import torch

    from emalign.embedded import heldout_code_prompts
    from emalign.evaluation.report import write_report
    from emalign.models import load_for_inference

    started = time.perf_counter()
    items, files = load_items(questions, samples, limit)  # before the model: fail fast on a bad file
    prompts = list(heldout_code_prompts() if code_prompts is None else code_prompts) if code_samples > 0 else []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    min_mass = judge_min_mass if judge_min_mass is not None else MIN_NUMBER_MASS
    if code_max_new_tokens is None:
        code_max_new_tokens = max_new_tokens
    elif code_max_new_tokens < 1:
        raise EvalError(f"code_max_new_tokens must be at least 1, got {code_max_new_tokens}")
    conscience = conscience if conscience is not None else Conscience()
    # Checked before the (possibly large) model loads; the default judge's identity is known already.
    _check_config(out, {
        "model": model, "adapter": adapter, "judge": judge.identity if judge else f"local:{model}",
        "judge_min_mass": getattr(judge, "min_mass", None) if judge else min_mass,
        "max_new_tokens": max_new_tokens, "code_max_new_tokens": code_max_new_tokens,
        "temperature": temperature, "top_p": top_p, "seed": seed,
        "question_sha256": [f["sha256"] for f in files], "code_prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
        "self_review_question": conscience.question if self_review else None,
    })
    lm, tokenizer = load_for_inference(model, adapter, dtype)  # type: ignore[arg-type]
    if torch.cuda.is_available():
        lm = lm.to("cuda")
    base: Models = lambda: without_adapter(lm)  # noqa: E731
    judge = judge or FrozenJudge(base, tokenizer, name=model, min_mass=min_mass)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, batch_size=batch_size)
    stages = dict(generating=lambda: nullcontext(lm), reviewing=base if self_review else None, tokenizer=tokenizer,
                  settings=settings, seed=seed, conscience=conscience)
    code_stages = {**stages, "settings": dataclasses.replace(settings, max_new_tokens=code_max_new_tokens)}

    done, code_done = read_rows(out / SAMPLES_FILE), read_rows(out / CODE_FILE)
    pending = [(i, it) for i, it in enumerate(items) if it.key not in done]
    code_all = code_keys(len(prompts), code_samples)
    code_pending = [c for c in code_all if c[0] not in code_done]
    resumed = len(items) - len(pending), len(code_all) - len(code_pending)
    writer, code_writer = RowWriter(out / SAMPLES_FILE), RowWriter(out / CODE_FILE)
    try:
        with _progress(progress) as bars:
            em_task = bars.add_task("EM answers", total=len(items), completed=resumed[0]) if bars else None
            code_task = bars.add_task("code answers", total=len(code_all), completed=resumed[1]) if bars and code_all else None
            _drain(pending, batch_size, lambda b: em_rows([it for _, it in b], [i for i, _ in b], judge=judge, **stages),
                   writer, done, bars, em_task)
            _drain(code_pending, batch_size, lambda b: code_rows([k for k, _, _ in b], [prompts[p] for _, p, _ in b],
                                                                 [g for _, _, g in b], **code_stages), code_writer, code_done, bars, code_task)
    finally:
        writer.close()
        code_writer.close()

    rows = [done[it.key] for it in items]  # this run's items only, in order (out may hold more)
    code = [code_done[k] for k, _, _ in code_all]
    summary = summarize_eval(rows, code)
    summary.update(
        name=name or Path(adapter or model).name, model=model, adapter=adapter,
        judge={"identity": judge.identity, "min_mass": getattr(judge, "min_mass", None), "stats_this_run": dict(getattr(judge, "stats", {}))},
        questions=files,
        sampling={"samples": samples, "limit": limit, "max_new_tokens": max_new_tokens, "temperature": temperature,
                  "top_p": top_p, "seed": seed, "batch_size": batch_size, "code_samples": code_samples,
                  "code_max_new_tokens": code_max_new_tokens},
        counts={"items": len(items), "resumed": resumed[0], "answered_now": len(pending), "code_items": len(code_all),
                "code_resumed": resumed[1], "code_answered_now": len(code_pending), "code_prompts": len(prompts)},
        seconds=round(time.perf_counter() - started, 1),
    )
    write_json_atomic(out / SUMMARY_FILE, summary)
    write_report(out, {summary["name"]: summary}, rows, history or None,
                 title=f"Emergent misalignment evaluation: {summary['name']}")
    return summary
