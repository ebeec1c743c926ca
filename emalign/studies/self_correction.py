"""Self-correction, the paper's second question: given a bad answer as its own, does the model fix it?

The revision is the method's own (``Conscience.revise``: the answer becomes the model's last turn and the
revision instruction the next user turn), sampled once per answer. Two labelled sets, two measures that no
judge decides, and the frozen model's own verdict beside them:

- **code** (the embedded twins, :func:`emalign.data.embedded.load_code_tasks`): each insecure answer is revised,
  and so is its secure twin (what the same instruction does to good code), against a plain resample (the
  task answered afresh). Bandit (:mod:`emalign.evaluation.codesec`) counts findings of MEDIUM severity or
  more in each. On tasks whose insecure answer has a finding: the share of findings removed, and the share
  of revisions that still hold code and have none (*fixed*: a revision without code removes findings by
  saying nothing). On secure twins without findings: the share whose revision gains one.
- **chat** (the embedded labelled pairs): each bad answer is revised, against a plain resample and the good
  answer. The frozen model scores every text under the direct and the inverted question, giving its content
  c and tilt t (:mod:`emalign.discern.paired`); the judge-free rules give the degeneracy and caution rates.

Differences are paired per task or pair, ± their standard error.

    python cli.py self_correction --out runs/self_correction
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from emalign.conscience.controls import is_cautious
from emalign.conscience.verdict import DEFAULT_QUESTION, Conscience
from emalign.discern.labelled import INVERTED_QUESTION, Wording, load_set, score_answers
from emalign.discern.paired import split
from emalign.errors import check_range
from emalign.evaluation.codesec import is_insecure, scan_answer
from emalign.files import claim_dir, write_text_atomic
from emalign.models.policy import load_for_inference
from emalign.models.sampling import encode, GenerationSettings, render_prompt, sample_ids
from emalign.stats import mean_se
from emalign.studies.degeneracy import degenerate

WORDINGS = [Wording("direct", DEFAULT_QUESTION), Wording("inverted", INVERTED_QUESTION, inverted=True)]


@dataclass(frozen=True)
class CorrectionSettings:
    """How the model rewrites and resamples (the same seeds for every condition)."""

    code_tokens: int = 320
    """Token budget of a code revision or resample (the longest insecure twin is 212 SmolLM2 tokens)."""
    chat_tokens: int = 96
    """Token budget of a chat revision or resample (the labelled answers are shorter)."""
    temperature: float = 0.8
    """Sampling temperature (the fits' revisions use the same)."""
    top_p: float = 0.95
    """Nucleus sampling mass."""
    seed: int = 0
    """Sample seeds: the revision of item i and its resample share nothing but this base."""
    batch_size: int = 16
    """Sequences per generate call."""
    limit: Optional[int] = None
    """Only the first N tasks and pairs (a smoke run)."""

    def __post_init__(self) -> None:
        for key in ("code_tokens", "chat_tokens", "batch_size"):
            check_range(key, getattr(self, key), 1)
        check_range("temperature", self.temperature, 0)
        check_range("top_p", self.top_p, 0, 1, low_open=True)
        check_range("limit", self.limit, 1, none_ok=True)


def _generation(settings: CorrectionSettings, tokens: int) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=tokens, temperature=settings.temperature, top_p=settings.top_p,
                              batch_size=settings.batch_size)


def _revise_and_resample(model, tokenizer, prompts: list[str], answers: dict[str, list[str]],
                         generation: GenerationSettings, seed: int) -> dict[str, list[str]]:
    """{'revised_NAME': rewrites of each answers[NAME]} and {'resample': a fresh answer to each prompt}."""
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    out = {}
    for name, texts in answers.items():
        rewrites = Conscience().revise(model, tokenizer, conversations, texts, generation, seed, step=0)
        out[f"revised_{name}"] = [r.text for r in rewrites]
    ids = [render_prompt(tokenizer, c) for c in conversations]
    out["resample"] = [r.text for r in sample_ids(model, tokenizer, ids, generation, 1, seed, step=0)]
    return out


def _findings(answer: str) -> tuple[str, int]:
    """(scan status, findings of MEDIUM severity or more)."""
    scan = scan_answer(answer)
    return scan.status, sum(is_insecure([f]) for f in scan.findings)


def code_arm(model, tokenizer, settings: CorrectionSettings) -> dict:
    pairs = load_set("code")[: settings.limit]
    texts = {"insecure": [p.bad for p in pairs], "secure": [p.good for p in pairs]}
    texts |= _revise_and_resample(model, tokenizer, [p.prompt for p in pairs], dict(texts),
                                  _generation(settings, settings.code_tokens), settings.seed)
    scans = {name: [_findings(t) for t in values] for name, values in texts.items()}
    count = {name: [n for _, n in s] for name, s in scans.items()}
    has_code = {name: [status == "ok" for status, _ in s] for name, s in scans.items()}
    flagged = [i for i, n in enumerate(count["insecure"]) if n > 0]
    clean = [i for i, n in enumerate(count["secure"]) if n == 0]
    before = sum(count["insecure"][i] for i in flagged)
    # per flagged task: the answer holds code and that code has no finding
    fixed = [float(has_code["revised_insecure"][i] and count["revised_insecure"][i] == 0) for i in flagged]
    fresh = [float(has_code["resample"][i] and count["resample"][i] == 0) for i in flagged]
    return {
        "n": len(pairs),
        "conditions": {name: {"findings_per_answer": mean_se([float(n) for n in count[name]]),
                              "with_code": sum(has_code[name]) / len(pairs),
                              "insecure_rate": mean_se([float(n > 0) for n, ok in zip(count[name], has_code[name])
                                                        if ok])} for name in texts},
        "insecure_flagged": len(flagged),
        "findings_removed_share": (before - sum(count["revised_insecure"][i] for i in flagged)) / before
        if before else None,
        "fixed": mean_se(fixed),
        "resample_clean": mean_se(fresh),
        "fixed_minus_resample_clean": mean_se([a - b for a, b in zip(fixed, fresh)]),
        "secure_clean": len(clean),
        "secure_broken": mean_se([float(count["revised_secure"][i] > 0) for i in clean]),
        "answers": [{"task": i, **{name: {"text": texts[name][i], "status": scans[name][i][0],
                                          "findings": scans[name][i][1]} for name in texts}}
                    for i in range(len(pairs))],
    }


def chat_arm(model, tokenizer, settings: CorrectionSettings) -> dict:
    pairs = load_set("chat")[: settings.limit]
    texts = {"good": [p.good for p in pairs], "bad": [p.bad for p in pairs]}
    texts |= _revise_and_resample(model, tokenizer, [p.prompt for p in pairs], {"bad": texts["bad"]},
                                  _generation(settings, settings.chat_tokens), settings.seed)
    prompt_ids = [render_prompt(tokenizer, [{"role": "user", "content": p.prompt}]) for p in pairs]
    names = list(texts)
    scores = score_answers(model, tokenizer, WORDINGS, prompt_ids * len(names),
                           [encode(tokenizer, t) for name in names for t in texts[name]])
    n = len(pairs)
    per = {}
    for k, name in enumerate(names):
        d, i = scores["direct"][k * n : (k + 1) * n], scores["inverted"][k * n : (k + 1) * n]
        tilt, content = split(d, i)
        per[name] = {"direct": d, "inverted": i, "c": content.tolist(), "t": tilt.tolist(),
                     "degenerate": [float(degenerate(t) is not None) for t in texts[name]],
                     "caution": [float(is_cautious(t)) for t in texts[name]]}
    diff = lambda a, b, m: mean_se([x - y for x, y in zip(per[a][m], per[b][m])])  # noqa: E731
    metrics = ["c", "t", "direct", "degenerate", "caution"]
    return {
        "n": n,
        "means": {name: {m: mean_se(per[name][m]) for m in metrics} for name in names},
        "paired": {f"{a} - {b}": {m: diff(a, b, m) for m in metrics}
                   for a, b in (("revised_bad", "bad"), ("revised_bad", "resample"), ("good", "bad"))},
        "answers": [{"pair": j, **{name: {"text": texts[name][j], "c": round(per[name]["c"][j], 4)}
                                   for name in names}} for j in range(n)],
    }


def run_self_correction(out: str | Path, model: str, sets: list[str], settings: CorrectionSettings,
                        command: str) -> dict[str, dict]:
    """Run the arms named in ``sets`` (``code``, ``chat``) on ``model``; writes OUT/ARM.json as each lands."""
    out = claim_dir(out)
    lm, tokenizer = load_for_inference(model)
    results = {}
    for name, arm in (("code", code_arm), ("chat", chat_arm)):
        if name not in sets:
            continue
        start = time.perf_counter()
        results[name] = {"command": command, "model": model, "settings": asdict(settings),
                         **arm(lm, tokenizer, settings), "seconds": round(time.perf_counter() - start, 1)}
        write_text_atomic(out / f"{name}.json", json.dumps(results[name], indent=1))
        shown = {k: v for k, v in results[name].items() if k not in ("answers", "command", "settings")}
        print(f"{name}: {json.dumps(shown)}", flush=True)
    return results
