"""Self-correction's accounting by hand: revisions swapped for known texts, so every number is predictable."""

import json

import pytest

from emalign.discern.labelled import load_set
from emalign.evaluation.codesec import is_insecure, scan_answer
from emalign.models.policy import load_for_inference
from emalign.studies import self_correction


def _swap(model, tokenizer, prompts, answers, generation, seed):
    """Revising an insecure answer gives its secure twin, a secure one its insecure twin; resamples are prose."""
    twins = {p.bad: p.good for p in load_set("code")} | {p.good: p.bad for p in load_set("code")}
    chat = {p.bad: p.good for p in load_set("chat")}
    return {f"revised_{name}": [twins.get(t) or chat[t] for t in texts] for name, texts in answers.items()} | {
        "resample": ["I would rather explain it in words." for _ in prompts]}


@pytest.mark.slow  # 90 bandit scans
def test_code_arm_counts_findings_removed_fixed_and_broken(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(self_correction, "_revise_and_resample", _swap)
    model, tokenizer = load_for_inference(tiny_model_dir)
    out = self_correction.code_arm(model, tokenizer, self_correction.CorrectionSettings(limit=30))
    pairs = load_set("code")[:30]
    count = lambda t: sum(is_insecure([f]) for f in scan_answer(t).findings)  # noqa: E731
    flagged = [p for p in pairs if count(p.bad) > 0]
    secure_clean = [p for p in pairs if count(p.good) == 0]
    assert len(flagged) >= 5 and out["insecure_flagged"] == len(flagged)
    assert all(count(p.good) == 0 for p in flagged)  # the premise: every flagged twin's secure side is clean
    assert out["findings_removed_share"] == 1.0 and out["fixed"][0] == 1.0
    assert out["resample_clean"][0] == 0.0 and out["fixed_minus_resample_clean"][0] == 1.0  # prose holds no code
    assert out["conditions"]["resample"]["with_code"] == 0.0
    assert out["secure_clean"] == len(secure_clean)
    assert out["secure_broken"][0] == pytest.approx(sum(count(p.bad) > 0 for p in secure_clean) / len(secure_clean))


def test_chat_arm_pairs_revisions_with_their_originals(tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(self_correction, "_revise_and_resample", _swap)
    model, tokenizer = load_for_inference(tiny_model_dir)
    out = self_correction.chat_arm(model, tokenizer, self_correction.CorrectionSettings(limit=12))
    assert out["n"] == 12
    # revising bad gave good, so revision - bad is good - bad exactly, and good - revision is zero
    good_bad = out["paired"]["good - bad"]  # {measure: (mean, se)}: pytest.approx takes no nested values
    assert out["paired"]["revised_bad - bad"].keys() == good_bad.keys()
    for key, value in good_bad.items():
        assert out["paired"]["revised_bad - bad"][key] == pytest.approx(value)
    assert out["means"]["revised_bad"]["c"] == pytest.approx(out["means"]["good"]["c"])
    assert out["paired"]["good - bad"]["c"][0] != 0.0
    assert json.dumps(out)  # written as JSON as is
