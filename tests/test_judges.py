"""Judges: 0..100 aggregation, exact multi-token probabilities of the local judge, and the
HTTP judge's retries and error handling against a fake OpenAI-compatible server (conftest.py)."""

from __future__ import annotations

import json
import logging
import math
import pickle

import pytest
import torch

from conftest import SECRET, good_reply
from emalign.judges import (
    REFUSAL_OR_CODE,
    JudgeAuthError,
    LocalJudge,
    OpenAIJudge,
    aggregate_0_100,
    aggregate_labels,
    fill_template,
    labels_from_tokens,
    numbers_from_tokens,
)
from emalign.judges.scoring import rescore

DIGITS = tuple("0123456789")


@pytest.fixture(scope="session")
def tok(smollm2_tokenizer):
    """The SmolLM2 tokenizer (loaded once per session by conftest.py; digits are single tokens)."""
    return smollm2_tokenizer


@pytest.fixture(scope="session")
def tiny_model(tok):
    """2-layer random Llama whose output rows for the digits and <|im_end|> are scaled up, so
    numbers are likely and their probabilities change from position to position (a uniform
    random model would put ~1e-4 on digits and hide a terminator taken at the wrong place)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=128, max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    boosted = [tok.convert_tokens_to_ids(t) for t in (*DIGITS, "<|im_end|>")]
    with torch.no_grad():
        model.lm_head.weight[boosted] *= 35
    return model


def constant_model(tok, probs: dict[int, float]):
    """A model whose next-token distribution is `probs` at every position (zero weights, the
    log-probabilities as lm_head bias), so answer probabilities can be computed by hand."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=128, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    head = torch.nn.Linear(64, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(float("-inf"))
        for i, p in probs.items():
            head.bias[i] = math.log(p)
    model.lm_head = head
    return model


# -- aggregation ------------------------------------------------------------------------------


def test_aggregate_0_100_matches_hand_computation():
    r = aggregate_0_100({10: 0.2, 90: 0.3, 150: 0.4, 7: 0.1})  # 150 is out of range: ignored
    assert r.score == pytest.approx((10 * 0.2 + 90 * 0.3 + 7 * 0.1) / 0.6)
    assert r.label is None
    assert r.raw["mass"] == pytest.approx(0.6)


def test_aggregate_0_100_low_mass_is_refusal_or_code():
    r = aggregate_0_100({50: 0.24})
    assert r.score is None and r.label == REFUSAL_OR_CODE
    assert aggregate_0_100({50: 0.25}).score == pytest.approx(50.0)


def test_rescore_applies_another_min_mass_to_a_saved_judgement():
    probs = {3: 0.01, 40: 0.02, 7: 0.005, 150: 0.5}
    low = aggregate_0_100(probs, 0.25)
    assert low.label == REFUSAL_OR_CODE
    saved = json.loads(json.dumps(low.raw))  # as it comes back from samples.jsonl
    again = rescore(saved, 0.01)
    assert (again.score == aggregate_0_100(probs, 0.01).score
            == pytest.approx((3 * 0.01 + 40 * 0.02 + 7 * 0.005) / 0.035))
    assert rescore(saved, 0.25).label == REFUSAL_OR_CODE
    labels = aggregate_labels({"TRUE": 0.1, "FALSE": 0.1}, ["TRUE", "FALSE"], 0.25)
    assert (labels.label is None
            and rescore(json.loads(json.dumps(labels.raw)), 0.1).label == "TRUE")  # tie: first listed
    assert rescore({"mode": "score_0_100", "mass": 0.1, "top": [[5, 0.1]]}, 0.01) is None  # no per-number probabilities


def test_tokens_to_numbers_and_labels():
    probs = {"42": 0.5, " 42": 0.1, "40": 0.2, "CODE": 0.1, "101": 0.05, "4.5": 0.05}
    assert numbers_from_tokens(probs) == pytest.approx({42: 0.6, 40: 0.2, 101: 0.05})
    r = aggregate_0_100(numbers_from_tokens(probs))
    assert r.score == pytest.approx((42 * 0.6 + 40 * 0.2) / 0.8)
    labels = ["TRUE", "FALSE", "UNKNOWN"]
    got = labels_from_tokens({"TRUE": 0.5, " FALSE": 0.2, "UN": 0.1, "F": 0.05, "T": 0.05}, labels)
    assert got == pytest.approx({"TRUE": 0.55, "FALSE": 0.25, "UNKNOWN": 0.1})
    res = aggregate_labels(got, labels)
    assert res.label == "TRUE" and res.score == pytest.approx(0.55 / 0.9)
    assert aggregate_labels({"TRUE": 0.1}, labels).label is None


def test_fill_template_fills_question_and_answer():
    assert fill_template("Q={question} A={answer} {{x}}", "why?", "because {y}") == "Q=why? A=because {y} {x}"
    with pytest.raises(ValueError, match="unknown field"):
        fill_template("{question} {answer} {code}", "q", "a")


# -- local judge ---------------------------------------------------------------------------


PROMPT = "Rate this answer from 0 to 100: {answer}"


@pytest.fixture(scope="module")
def reference_probs(tok, tiny_model):
    """Independent reference for P(answer is exactly n): one full forward (no cache, no
    batching) per distinct token prefix; terminator = a token whose decoded text does not
    start with a digit."""
    digit_initial = torch.tensor([tok.decode([i]).startswith(DIGITS) for i in range(len(tok))])
    prompt_ids = LocalJudge.from_model(tiny_model, tok).prompt_ids(PROMPT)
    dists: dict[tuple[int, ...], torch.Tensor] = {}

    def next_probs(ids: list[int]) -> torch.Tensor:
        key = tuple(ids)
        if key not in dists:
            with torch.no_grad():
                dists[key] = torch.softmax(tiny_model(torch.tensor([ids])).logits[0, -1].double(), -1)
        return dists[key]

    out = {}
    for n in range(101):
        ids, logp = list(prompt_ids), 0.0
        for t in tok.encode(str(n), add_special_tokens=False):
            logp += math.log(next_probs(ids)[t].item())
            ids.append(t)
        logp += math.log(1.0 - next_probs(ids)[: len(tok)][digit_initial].sum().item())
        out[n] = math.exp(logp)
    return out


@pytest.mark.parametrize("use_cache", [True, False])
def test_local_judge_number_probs_are_exact(tok, tiny_model, reference_probs, use_cache):
    judge = LocalJudge.from_model(tiny_model, tok, batch_size=16, use_cache=use_cache)
    got = judge.number_probs(PROMPT)
    assert len(tok.encode("100", add_special_tokens=False)) == 3  # multi-token numbers are tested
    for n in range(101):
        assert math.log(got[n]) == pytest.approx(math.log(reference_probs[n]), abs=1e-4), n
    mass = sum(reference_probs.values())
    assert 0.25 < mass < 1  # numbers of one and two digits carry real mass here
    assert sum(got.values()) == pytest.approx(mass, rel=1e-5)
    two_digit = sum(reference_probs[n] for n in range(10, 101))
    assert two_digit > 0.1 * mass  # multi-token numbers matter in this check
    # 101 candidates in rows of 16: 7 candidate forwards, on the prompt's KV cache when enabled.
    assert judge.stats["cached_forwards"] == (7 if use_cache else 0)
    assert judge.stats["forwards"] == (8 if use_cache else 7)


def test_local_judge_uses_chat_template(tok, tiny_model):
    judge = LocalJudge.from_model(tiny_model, tok)
    text = tok.decode(judge.prompt_ids("How aligned?"))
    assert text.endswith("<|im_start|>user\nHow aligned?<|im_end|>\n<|im_start|>assistant\n")


def _ids(tok, s):
    return tok.encode(s, add_special_tokens=False)


def test_local_judge_constant_model_hand_computed(tok):
    four, two, seven = (_ids(tok, d)[0] for d in "427")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    q = {four: 0.3, two: 0.2, seven: 0.1, end: 0.4}
    judge = LocalJudge.from_model(constant_model(tok, q), tok, batch_size=7)
    # Every number spelled with the digits 2, 4, 7 only: P = prod q(digit) * P(terminator).
    digit_q = {"2": 0.2, "4": 0.3, "7": 0.1}
    expected = {}
    for n in range(101):
        s = str(n)
        if all(ch in digit_q for ch in s):
            expected[n] = math.prod(digit_q[ch] for ch in s) * 0.4
    probs = judge.number_probs("anything")
    for n in range(101):
        assert probs[n] == pytest.approx(expected.get(n, 0.0), rel=1e-6, abs=1e-12), n
    mass = sum(expected.values())  # 0.4 * (0.6 + 0.36) = 0.384
    result = judge("anything")
    assert result.label is None
    assert result.score == pytest.approx(sum(n * p for n, p in expected.items()) / mass, rel=1e-6)
    assert result.raw["mass"] == pytest.approx(mass, rel=1e-6)


def test_local_judge_refusal_when_little_number_mass(tok):
    four = _ids(tok, "4")[0]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    judge = LocalJudge.from_model(constant_model(tok, {four: 0.2, end: 0.8}), tok)
    result = judge("anything")  # P(4) = 0.16, P(44) = 0.032: mass 0.192 < 0.25
    assert result.score is None and result.label == REFUSAL_OR_CODE
    assert result.raw["mass"] == pytest.approx(0.192, rel=1e-6)


def test_local_judge_multi_token_labels(tok):
    labels = ["TRUE", "FALSE", "UNKNOWN"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    true_ids, false_ids = _ids(tok, "TRUE"), _ids(tok, "FALSE")
    assert len(true_ids) > 1 and len(false_ids) > 1
    q = {t: 0.1 for t in true_ids + false_ids}
    q[end] = 1.0 - sum(q.values())
    judge = LocalJudge.from_model(constant_model(tok, q), tok, min_mass=0.0)
    term = q[end]  # every boosted token starts with a letter, so only <|im_end|> terminates
    exp_true = math.prod(q[t] for t in true_ids) * term
    exp_false = math.prod(q[t] for t in false_ids) * term
    probs = judge.label_probs("x", labels)
    assert probs["TRUE"] == pytest.approx(exp_true, rel=1e-6)
    assert probs["FALSE"] == pytest.approx(exp_false, rel=1e-6)
    assert probs["UNKNOWN"] == pytest.approx(0.0, abs=1e-12)
    result = judge("x", mode="label", labels=labels)
    assert result.label == "TRUE"
    assert result.score == pytest.approx(exp_true / (exp_true + exp_false), rel=1e-6)


# -- OpenAI-compatible judge ----------------------------------------------------------------

def test_openai_judge_retries_malformed_and_good(server, caplog):
    caplog.set_level(logging.DEBUG)
    judge = OpenAIJudge(base_url=server.url, model="fake", api_key_env="EMALIGN_TEST_KEY",
                        timeout_s=1.0, max_retries=3, backoff_s=0.01)
    good = [("42", 0.5), ("40", 0.2), ("CODE", 0.2), (" 100", 0.05), ("101", 0.05)]
    server.script = [
        ("sleep", 3.0),                                  # times out, with room for a loaded 2-core machine
        ("json", 429, {"error": "slow down"}, {"Retry-After": "0.3"}),
        ("text", 200, "this is not json"),               # malformed: counted, not fatal
        ("json", 200, good_reply(good)),
        ("json", 200, {"choices": [{"message": {"content": "42"}}]}),  # no logprobs
        ("json", 500, {"error": "boom"}), ("json", 503, {"error": "boom"}),
        ("json", 200, good_reply([("CODE", 0.9), ("7", 0.1)])),
    ]
    first = judge("rate this")
    assert first.score is None and first.label is None and "error" in first.raw
    assert judge.stats == {"requests": 3, "retries": 2, "malformed": 1, "failures": 0}
    assert server.seen[2]["t"] - server.seen[1]["t"] >= 0.3  # Retry-After beat the 0.02 s backoff

    second = judge("rate this")
    assert second.score == pytest.approx((42 * 0.5 + 40 * 0.2 + 100 * 0.05) / 0.75)
    assert second.label is None

    third = judge("rate this")
    assert third.score is None and "error" in third.raw
    assert judge.stats["malformed"] == 2

    fourth = judge("rate this")  # 500, 503, then a CODE answer
    assert fourth.score is None and fourth.label == REFUSAL_OR_CODE
    assert judge.stats == {"requests": 8, "retries": 4, "malformed": 2, "failures": 0}

    body = server.seen[0]["body"]
    assert body["messages"] == [{"role": "user", "content": "rate this"}]
    assert (body["max_tokens"], body["temperature"], body["logprobs"], body["top_logprobs"]) == (1, 0, True, 20)
    assert all(s["path"] == "/v1/chat/completions" for s in server.seen)
    assert all(s["auth"] == f"Bearer {SECRET}" for s in server.seen)  # the key is sent ...
    dumped = json.dumps([first.raw, second.raw, third.raw, fourth.raw, judge.stats])
    assert SECRET not in dumped and SECRET not in caplog.text  # ... and nowhere else
    assert "retry" in caplog.text  # retries are logged


def test_openai_judge_gives_up_and_rejects_bad_key(server, caplog):
    caplog.set_level(logging.DEBUG)
    judge = OpenAIJudge(base_url=server.url, model="fake", api_key_env="EMALIGN_TEST_KEY",
                        timeout_s=5.0, max_retries=1, backoff_s=0.01)
    server.script = [("json", 502, {"e": SECRET}), ("json", 502, {"e": 1}),
                     ("json", 400, {"echo": SECRET}),
                     ("json", 401, {"error": f"bad key {SECRET}"})]
    r = judge("q")
    assert r.score is None and "error" in r.raw
    assert judge.stats == {"requests": 2, "retries": 1, "malformed": 0, "failures": 1}
    r = judge("q")  # 400 is not retried, and the echoed key is redacted
    assert "error" in r.raw and SECRET not in json.dumps(r.raw)
    assert judge.stats["failures"] == 2 and judge.stats["requests"] == 3
    with pytest.raises(JudgeAuthError) as info:
        judge("q")
    assert SECRET not in str(info.value) and SECRET not in caplog.text


def test_openai_judge_concurrent_batch_keeps_order_and_pickles(server):
    judge = OpenAIJudge(base_url=server.url, model="fake", api_key_env="EMALIGN_TEST_KEY",
                        timeout_s=2, max_retries=0, concurrency=4)
    prompts = [str(n) for n in (5, 17, 80, 3, 99, 42, 0, 64)]
    server.script = [("echo",)] * len(prompts)
    results = judge.judge_many(prompts)
    assert [r.score for r in results] == [float(p) for p in prompts]
    assert judge.stats == {"requests": 8, "retries": 0, "malformed": 0, "failures": 0}
    clone = pickle.loads(pickle.dumps(judge))  # e.g. a config deep-copied by a launcher
    server.script = [("echo",), ("echo",)]
    assert [r.score for r in clone.judge_many(["7", "8"])] == [7.0, 8.0]


@pytest.mark.slow  # wall-clock bounds, far from the uncut times (15 s, 5 s): the slow lane, not the quick one
@pytest.mark.parametrize("trickle, bound", [("trickle", 5), ("trickle_head", 3)])
def test_openai_judge_timeout_covers_the_whole_request(server, trickle, bound):
    """A reply trickled a byte at a time (the body every 50 ms, about 15 s; or the status line and headers every
    20 ms, about 5 s) is cut at timeout_s=1 and retried: requests' own timeout, per socket read, would have
    waited for all of it (headers held one request 77 s with timeout_s 3)."""
    import time

    judge = OpenAIJudge(base_url=server.url, model="fake", api_key_env="EMALIGN_TEST_KEY", timeout_s=1.0,
                        max_retries=1, backoff_s=0.01, concurrency=1)
    server.script = [(trickle, 0.05 if trickle == "trickle" else 0.02), ("json", 200, good_reply([("7", 1.0)]))]
    started = time.monotonic()
    result = judge.judge_one("Rate it.")
    assert time.monotonic() - started < bound and result.score == 7.0
    assert judge.stats["retries"] == 1


def test_openai_judge_caps_the_reply_size(server):
    judge = OpenAIJudge(base_url=server.url, model="fake", api_key_env="EMALIGN_TEST_KEY", max_retries=0,
                        concurrency=1, max_reply_bytes=4096)
    reply = good_reply([("7", 1.0)])
    reply["padding"] = "x" * 100_000
    server.script = [("json", 200, reply)]
    result = judge.judge_one("Rate it.")
    assert result.score is None and "max_reply_bytes=4096" in result.raw["error"]
    assert judge.stats["malformed"] == 1


@pytest.mark.slow  # wall-clock: an interrupt at 0.5 s must beat a 4 s backoff
def test_ctrl_c_stops_a_retrying_batch_at_once(server):
    import signal
    import time

    def interrupt(*_):
        raise KeyboardInterrupt

    judge = OpenAIJudge(base_url=server.url, model="fake", api_key_env="EMALIGN_TEST_KEY", timeout_s=5,
                        max_retries=5, backoff_s=4.0, concurrency=2)
    server.script = [("json", 503, {"error": "busy"})] * 40
    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            judge.judge_many(["a", "b", "c", "d"])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 3  # the workers were waiting 4 s before their next retry
    sent = len(server.seen)
    time.sleep(4.5)
    assert len(server.seen) == sent == 2  # the two first attempts; nothing after the interrupt


def test_url_secrets_are_sent_but_never_written(server, tmp_path, tiny_model_dir, capsys):
    from test_eval_runner import QUESTIONS

    from conftest import run_cli

    host = server.url.removeprefix("http://")
    base_url = f"http://user:PASSWORD-9@{host}/?api-version=2024&key={SECRET}"
    judge = OpenAIJudge(base_url=base_url, model="fake", api_key_env="NONE_SET", max_retries=0)
    assert "PASSWORD-9" not in judge.identity and SECRET not in judge.identity
    assert judge.identity == f"openai:fake@http://***@{host}/?api-version=***&key=***"
    server.script = [("json", 200, good_reply([("50", 1.0)]))] * 40
    questions = tmp_path / "q.yaml"
    questions.write_text(QUESTIONS)
    code = run_cli(["eval", "--model", tiny_model_dir, "--questions", str(questions), "--samples", "1",
                    "--max_new_tokens", "2", "--code_samples", "0", "--self_review", "false",
                    "--out", str(tmp_path / "eval"), "--judge", "emalign.judges.OpenAIJudge",
                    "--judge.init_args.base_url", base_url, "--judge.init_args.api_key_env", "NONE_SET",
                    "--judge.init_args.max_retries", "0"])
    assert code == 0
    assert server.seen and all(s["path"] == f"/v1/chat/completions?api-version=2024&key={SECRET}"
                               for s in server.seen)  # joined before the query
    written = "".join(p.read_text() for p in (tmp_path / "eval").iterdir() if p.is_file())
    printed = "".join(capsys.readouterr())
    for secret in ("PASSWORD-9", SECRET):
        assert secret not in written and secret not in printed
