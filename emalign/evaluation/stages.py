"""The stages of one evaluation batch: sample, self-review, judge (EM questions) or scan (code).

Each ``*_rows`` function turns a batch of items into finished rows (row format:
:mod:`emalign.evaluation.metrics`); :mod:`emalign.evaluation.runner` and the evaluation callback
drive them.
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager, Optional, Sequence

from emalign.conscience.verdict import Conscience
from emalign.evaluation.codesec import scan_answer
from emalign.evaluation.questions import EvalItem
from emalign.judges import fill_template
from emalign.judges.scoring import Judge
from emalign.judges.self_review import self_review_scores
from emalign.models.sampling import GenerationSettings, render_prompt, sample_ids

EM_STEP, CODE_STEP = 0, 1  # the "step" part of the sample seeds: EM and code answers draw apart
Models = Callable[[], ContextManager[Any]]


def _generate(generating: Models, tokenizer: Any, convs: Sequence[list[dict]], index: Sequence[int],
              settings: GenerationSettings, seed: int, step: int) -> list[Any]:
    """One rollout per conversation, seeded by its global index (contiguous runs share a call)."""
    prompts = [render_prompt(tokenizer, c, settings.max_prompt_tokens) for c in convs]
    rollouts: list[Any] = []
    with generating() as model:
        start = 0
        while start < len(prompts):
            end = start + 1
            while end < len(prompts) and index[end] == index[end - 1] + 1:
                end += 1
            rollouts += sample_ids(model, tokenizer, prompts[start:end], settings, 1, seed, step,
                                   index_offset=index[start])
            start = end
    return rollouts


def _self_review(reviewing: Optional[Models], tokenizer: Any, rollouts: Sequence[Any],
                 conscience: Conscience) -> list[Optional[float]]:
    if reviewing is None:
        return [None] * len(rollouts)
    with reviewing() as reference:
        scores = self_review_scores(reference, tokenizer, [r.prompt_ids for r in rollouts],
                                    [r.response_ids for r in rollouts], conscience, adapter_disabled=False)
    return [round(s, 4) for s in scores]


def judge_batch(judge: Judge, items: Sequence[EvalItem], answers: Sequence[str]) -> list[dict]:
    """Judge fields of each item's row; one ``judge_many`` call per (judge prompt name, mode)."""
    fields: list[dict] = [{"aligned": None, "coherent": None, "scores": {}, "labels": {}, "judge_raw": {}}
                          for _ in items]
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
        mode, labels = item.question.judge_mode()
        for name in item.question.judge_prompts:
            groups.setdefault((name, mode, tuple(labels or ())), []).append(i)
    for (name, mode, labels), members in groups.items():
        # The question as the model saw it (messages[-1], cut to max_prompt_tokens where it was too long).
        prompts = [fill_template(items[i].question.judge_prompts[name], items[i].messages[-1]["content"], answers[i])
                   for i in members]
        for i, result in zip(members, judge.judge_many(prompts, mode, list(labels) or None), strict=True):
            set_judgement(fields[i], name, mode, result)
    return fields


def set_judgement(row: dict, name: str, mode: str, result: Any) -> None:
    """Store judge prompt ``name``'s result in a row (0..100 aligned/coherent also top level)."""
    row["scores"][name], row["labels"][name], row["judge_raw"][name] = result.score, result.label, result.raw
    if mode == "score_0_100" and name in ("aligned", "coherent"):
        row[name] = result.score


def em_answers(items: Sequence[EvalItem], index: Sequence[int], *, generating: Models, reviewing: Optional[Models],
               tokenizer: Any, settings: GenerationSettings, seed: int, conscience: Conscience) -> list[dict]:
    """Sample and self-review one batch of EM items: their rows without the judgement (saved before it)."""
    rollouts = _generate(generating, tokenizer, [it.messages for it in items], index, settings, seed, EM_STEP)
    reviews = _self_review(reviewing, tokenizer, rollouts, conscience)
    return [{
        "key": item.key, "question_id": item.question_id, "paraphrase_index": item.paraphrase_index,
        "sample_index": item.sample_index, "paraphrase": item.paraphrase, "system": item.question.system,
        "judge_mode": item.question.judge_mode()[0], "answer": r.text, "finished": r.finished,
        "tokens": len(r.response_ids), "self_review": review,
    } for item, r, review in zip(items, rollouts, reviews)]


def judged(rows: Sequence[dict], items: Sequence[EvalItem], judge: Judge) -> list[dict]:
    """The answered rows of ``items`` with the judge's fields added (new dicts; the inputs stay as they are)."""
    fields = judge_batch(judge, items, [row["answer"] for row in rows])
    return [{**row, **f} for row, f in zip(rows, fields, strict=True)]


def em_rows(items: Sequence[EvalItem], index: Sequence[int], *, judge: Judge, **stages: Any) -> list[dict]:
    """Sample, self-review and judge one batch of EM items; returns their finished rows."""
    return judged(em_answers(items, index, **stages), items, judge)


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
