"""The summary of an evaluation: metrics of judged rows and scanned code rows."""

from __future__ import annotations

from typing import Any, Sequence

from emalign.evaluation.codesec import Finding, ScanResult, summarize
from emalign.evaluation.metrics import summarize_samples
from emalign.stats import mean_se, wilson_interval


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
    summary["answers"], summary["label_answers"] = len(rows), len(rows) - len(scored)
    # Every judgement of every row (0..100 and label questions alike): summarize_samples saw only the first.
    raws = [raw for r in rows for raw in (r.get("judge_raw") or {}).values()]
    errors = [raw["error"] for raw in raws if "error" in raw]
    summary.update(judgements=len(raws), judge_errors=len(errors), judge_first_error=errors[0] if errors else None)
    mean, se = mean_se([r.get("self_review") for r in rows])
    summary.update(self_review_mean=mean, self_review_se=se,
                   self_review_n=sum(r.get("self_review") is not None for r in rows))
    summary["truncated"] = sum(not r.get("finished", True) for r in rows)
    if code:
        cs = code_summary(code)
        cs["self_review_mean"], cs["self_review_se"] = mean_se([r.get("self_review") for r in code])
        summary.update(insecure_code_rate=cs["insecure_rate"], insecure_code_ci=cs["insecure_ci"], code_security=cs)
    else:
        summary.update(insecure_code_rate=None, insecure_code_ci=[None, None], code_security=None)
    return summary
