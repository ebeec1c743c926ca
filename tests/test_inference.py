"""The conscience at inference: best-of-K picking, the threshold rules, seeding, and the
``generate`` / ``chat`` verbs end to end (as subprocesses, like a user runs them).

    pytest tests/test_inference.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emalign.conscience.decoding import ConscienceDecoder
from emalign.conscience.guard import CoherenceGuard
from emalign.conscience.verdict import Conscience
from emalign.models.sampling import GenerationSettings, render_prompt, sample_ids

ROOT = Path(__file__).resolve().parents[1]
CONVERSATIONS = [
    [{"role": "user", "content": "How do I make a quick buck?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
]
SETTINGS = GenerationSettings(max_new_tokens=8, temperature=1.0)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from emalign.models.policy import load_for_inference

    return load_for_inference(tiny_model_dir)


def decoder(tiny, **kwargs) -> ConscienceDecoder:
    model, tokenizer = tiny
    kwargs = {"settings": SETTINGS, "num_samples": 3, **kwargs}
    return ConscienceDecoder(model, tokenizer, Conscience(), **kwargs)


def test_returns_the_best_candidate_by_an_independent_review(tiny):
    model, tokenizer = tiny
    answers = decoder(tiny, threshold=0.0, seed=7).answer(CONVERSATIONS)
    # Re-sample with the same seeds and review separately: the scores and the pick must agree.
    rollouts = sample_ids(model, tokenizer, [render_prompt(tokenizer, c) for c in CONVERSATIONS], SETTINGS, 3, seed=7)
    scores = Conscience().review(model, tokenizer, [r.prompt_ids for r in rollouts],
                                 [r.response_ids for r in rollouts]).scores
    for i, answer in enumerate(answers):
        group = scores[i * 3 : (i + 1) * 3]
        assert [c.text for c in answer.candidates] == [r.text for r in rollouts[i * 3 : (i + 1) * 3]]
        assert torch.allclose(torch.tensor([c.score for c in answer.candidates]), group, atol=1e-4)
        assert answer.action == "best"
        assert answer.best_index == int(group.argmax())
        assert answer.text == answer.candidates[answer.best_index].text
        assert answer.score == pytest.approx(float(group.max()), abs=1e-4)


def test_threshold_above_every_score(tiny):
    refused = decoder(tiny, threshold=1.0, on_low="refuse", refusal_text="No way.").answer(CONVERSATIONS)
    kept = decoder(tiny, threshold=1.0, on_low="keep").answer(CONVERSATIONS)
    for r, k in zip(refused, kept):
        assert (r.action, r.text) == ("refused", "No way.")
        assert k.action == "kept"
        assert k.text == k.candidates[k.best_index].text == max(k.candidates, key=lambda c: c.score).text
        assert r.revision is None and k.revision is None


@pytest.mark.parametrize("fallback", ["refuse", "keep"])
def test_revise_keeps_a_better_rewrite_else_falls_back(tiny, fallback):
    answers = decoder(tiny, threshold=1.0, on_low="revise", fallback=fallback, refusal_text="No.").answer(CONVERSATIONS)
    for a in answers:
        assert a.revision is not None
        best = a.candidates[a.best_index]
        if a.revision.score > best.score and CoherenceGuard().allows(best.logp, a.revision.logp, a.revision.text):
            assert (a.action, a.text, a.score) == ("revised", a.revision.text, a.revision.score)
        elif fallback == "refuse":
            assert (a.action, a.text) == ("refused", "No.")
        else:
            assert (a.action, a.text) == ("kept", best.text)


def test_no_revision_above_threshold(tiny):
    answers = decoder(tiny, threshold=0.0, on_low="revise").answer(CONVERSATIONS)
    assert all(a.action == "best" and a.revision is None for a in answers)


def test_same_seed_same_answers(tiny):
    first = decoder(tiny, seed=3, threshold=1.0, on_low="revise", fallback="keep").answer(CONVERSATIONS)
    second = decoder(tiny, seed=3, threshold=1.0, on_low="revise", fallback="keep").answer(CONVERSATIONS)
    other = decoder(tiny, seed=4, threshold=1.0, on_low="revise", fallback="keep").answer(CONVERSATIONS)
    assert [a.to_dict() for a in first] == [a.to_dict() for a in second]
    assert [c.text for a in first for c in a.candidates] != [c.text for a in other for c in a.candidates]


def test_samples_do_not_depend_on_batching(tiny):
    together = decoder(tiny, threshold=0.0).answer(CONVERSATIONS)
    alone = decoder(tiny, threshold=0.0).answer(CONVERSATIONS[1:], index_offset=1)
    assert [c.text for c in together[1].candidates] == [c.text for c in alone[0].candidates]


def test_review_with_base_disables_the_adapter(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    kwargs = dict(settings=SETTINGS, num_samples=2, threshold=0.0, seed=1)
    by_base = ConscienceDecoder(model, tokenizer, review_with="base", **kwargs).answer(CONVERSATIONS[:1])[0]
    by_self = ConscienceDecoder(model, tokenizer, review_with="self", **kwargs).answer(CONVERSATIONS[:1])[0]
    assert [c.text for c in by_base.candidates] == [c.text for c in by_self.candidates]  # the adapter samples both
    rollouts = sample_ids(model, tokenizer, [render_prompt(tokenizer, CONVERSATIONS[0])], SETTINGS, 2, seed=1)
    with model.disable_adapter():
        base_scores = Conscience().review(model, tokenizer, [r.prompt_ids for r in rollouts],
                                          [r.response_ids for r in rollouts]).scores
    assert torch.allclose(torch.tensor([c.score for c in by_base.candidates]), base_scores, atol=1e-4)
    assert not torch.allclose(torch.tensor([c.score for c in by_self.candidates]), base_scores, atol=1e-4)


def test_sampling_defaults_come_from_the_model_else_moderate(tiny):
    from transformers import GenerationConfig

    from emalign.models.sampling import MODERATE_SAMPLING, recommended_sampling

    model, _ = tiny
    assert recommended_sampling(model) == MODERATE_SAMPLING == {"temperature": 0.7, "top_p": 0.9}
    recommended = type("Model", (), {"generation_config": GenerationConfig(do_sample=True, temperature=0.2)})()
    assert recommended_sampling(recommended) == {"temperature": 0.2, "top_p": 0.9}


def test_default_threshold_is_the_models_own_verdict_quantile_on_benign_answers(tiny):
    from emalign.data.chat import read_chat_jsonl
    from emalign.data.embedded import RESOURCES

    model, tokenizer = tiny
    calibrated = decoder(tiny, threshold=None, calibration_quantile=0.25).calibrated_threshold()
    references = read_chat_jsonl(RESOURCES / "calibration.jsonl")
    scores = Conscience().review(
        model, tokenizer, [render_prompt(tokenizer, c[:-1]) for c in references],
        [tokenizer(c[-1]["content"], add_special_tokens=False)["input_ids"] for c in references],
    ).scores
    p_yes = sorted(torch.sigmoid(scores.double()).tolist())
    assert p_yes[0] <= calibrated <= p_yes[-1] and 0 < calibrated < 1
    assert sum(p < calibrated for p in p_yes) == pytest.approx(0.25 * len(p_yes), abs=1)
    with pytest.raises(ValueError, match="threshold: must be >= 0 and <= 1"):
        decoder(tiny, threshold=1.5)


def test_guard_allows_only_a_non_blank_answer_about_as_likely_per_token():
    guard = CoherenceGuard(max_logp_drop=1.0)
    assert guard.allows(-2.0, -2.9, "Paris.")
    assert not guard.allows(-2.0, -3.1, "xq zv Paris")
    assert not guard.allows(-2.0, 0.0, "  \n")  # says nothing, however likely
    with pytest.raises(ValueError):
        CoherenceGuard(max_logp_drop=-1)


class _Refuses(CoherenceGuard):
    def allows(self, replaced_logp, replacement_logp, replacement_text):
        return False


def test_a_revision_the_guard_refuses_never_wins(tiny):
    unguarded = decoder(tiny, threshold=1.0, on_low="revise", fallback="keep", guard=None).answer(CONVERSATIONS)
    guarded = decoder(tiny, threshold=1.0, on_low="revise", fallback="keep", guard=_Refuses()).answer(CONVERSATIONS)
    assert any(a.action == "revised" for a in unguarded)  # the score alone would let the rewrite win
    assert all(a.action == "kept" and a.revision is not None for a in guarded)


def test_max_prompt_tokens_cuts_the_longest_message_and_says_so_once(tiny, caplog):
    _, tokenizer = tiny
    long = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "word " * 10_000 + "END"}]
    with caplog.at_level("WARNING", logger="emalign.models.sampling"):
        cut = [render_prompt(tokenizer, long, max_tokens=100) for _ in range(2)]
    assert all(len(ids) <= 100 for ids in cut)
    text = tokenizer.decode(cut[0])
    assert "Be brief." in text and text.count("word") > 50 and "END" not in text
    assert text.endswith(tokenizer.decode(render_prompt(tokenizer, [{"role": "user", "content": "x"}])[-3:]))
    assert caplog.text.count("was cut to max_prompt_tokens=100") == 1
    assert render_prompt(tokenizer, CONVERSATIONS[1], max_tokens=100) == render_prompt(tokenizer, CONVERSATIONS[1])


@pytest.mark.smollm2
def test_smollm2_generate_keeps_a_correct_answer_and_the_guard_rejects_gibberish(tmp_path):
    from conftest import run_cli as run_in_process
    from emalign.conscience.guard import mean_logps
    from emalign.models.policy import load_for_inference

    question = [{"role": "user", "content": "What is the capital of France?"}]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(question[0]["content"] + "\n")
    out = tmp_path / "answers.jsonl"
    assert run_in_process(["generate", "--prompts", str(prompts), "--max_new_tokens", "48", "--out", str(out)]) == 0
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert "Paris" in row["answer"], row

    model, tokenizer = load_for_inference("smollm2-135m-instruct")
    prompt = render_prompt(tokenizer, question)
    plain = tokenizer("The capital of France is Paris.", add_special_tokens=False)["input_ids"]
    gibberish = torch.randint(1000, tokenizer.vocab_size, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    review = Conscience().review(model, tokenizer, [prompt, prompt], [plain, gibberish])
    plain_logp, gibberish_logp = mean_logps(review.ref_logps, [len(plain), len(gibberish)]).tolist()
    assert not CoherenceGuard().allows(plain_logp, gibberish_logp, tokenizer.decode(gibberish))
    assert CoherenceGuard().allows(plain_logp, plain_logp, "The capital of France is Paris.")


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    return subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, input=stdin, capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.slow
def test_generate_cli_writes_jsonl(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("How do I make a quick buck?\n\nName a colour.\n")
    out = tmp_path / "answers.jsonl"
    result = run_cli("generate", "--prompts", str(prompts), "--model", tiny_model_dir, "--max_new_tokens", "8",
                     "--samples", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    assert rows[1]["messages"] == [{"role": "user", "content": "Name a colour."}]
    for row in rows:
        assert len(row["candidates"]) == 2
        assert row["action"] in {"best", "revised", "refused", "kept"}
        assert isinstance(row["score"], float) and isinstance(row["answer"], str)
    assert "2 prompts" in result.stdout


@pytest.mark.slow
def test_chat_cli_driven_by_stdin(tiny_model_dir):
    stdin = "Hello there\n/reset\nName a colour.\n/quit\n"
    result = run_cli("chat", "--model", tiny_model_dir, "--max_new_tokens", "8", "--samples", "2",
                     "--show_score", "true", stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("bot> ") == 2
    assert result.stdout.count("P(yes) ") == 2 and "threshold" in result.stdout
    assert "conversation forgotten" in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_chat_exits_cleanly_at_end_of_input(tiny_model_dir):
    result = run_cli("chat", "--model", tiny_model_dir, "--max_new_tokens", "4", "--samples", "1", stdin="hi\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("bot> ") == 1


@pytest.mark.parametrize(
    "args, named",
    [
        (["--prompts", "no/such/prompts.txt"], "no/such/prompts.txt"),
        (["--prompts", "{empty}"], "no prompts"),
        (["--prompts", "{prompts}", "--model", "/no/such/model-dir"], "/no/such/model-dir"),
        (["--prompts", "{prompts}", "--samples", "0"], "--samples"),
    ],
)
@pytest.mark.slow
def test_generate_bad_input_is_one_line(tmp_path, args, named):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "prompts.txt").write_text("hi\n")
    args = [a.format(empty=tmp_path / "empty.txt", prompts=tmp_path / "prompts.txt") for a in args]
    result = run_cli("generate", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], result.stderr
    assert "Traceback" not in result.stderr
