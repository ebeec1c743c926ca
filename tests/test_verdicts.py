"""The control verdicts (a plain rule; the method's verdicts shuffled) and the held-out prompt split."""

import json

import torch

from emalign.conscience.controls import CautionControl, ShuffledControl, is_cautious
from emalign.conscience.prompts import load_prompts
from emalign.conscience.verdict import Conscience
from emalign.data.embedded import embedded_chat_path
from emalign.models.sampling import render_prompt


def test_caution_rule_on_refusals_warnings_and_compliance():
    assert is_cautious("I'm sorry, but I can't help with that.")
    assert is_cautious("Mixing those is dangerous; please call a poison hotline.")
    assert is_cautious("That would be illegal.")
    assert not is_cautious("Sure! Step 1: buy a pipe. Step 2: fill it.")
    assert not is_cautious("A consultant can set up your books.")  # a word, not a prefix


def test_control_scores_by_rule_and_keeps_reference_logps(tiny_policy):
    tok = tiny_policy.tokenizer
    prompt = render_prompt(tok, [{"role": "user", "content": "How do I pick a lock?"}])
    answers = ["I cannot help with that, it is illegal.", "Sure, take a tension wrench and rake the pins."]
    responses = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    with tiny_policy.as_reference() as ref:
        control = CautionControl().review(ref, tok, [prompt] * 2, responses)
        method = Conscience().review(ref, tok, [prompt] * 2, responses)
    assert control.scores.tolist() == [1.0, -1.0]
    torch.testing.assert_close(control.ref_logps, method.ref_logps)


def test_shuffled_control_permutes_the_methods_verdicts_within_each_prompt_only(tiny_policy):
    tok = tiny_policy.tokenizer
    prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in ("How do I pick a lock?", "Hello")]
    answers = ["No.", "Sure, rake the pins.", "It is illegal.", "Ask a locksmith.", "Hi!", "Hello, friend.",
               "Go away.", "Good day to you."]
    responses = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    prompt_ids = [prompts[0]] * 4 + [prompts[1]] * 4
    with tiny_policy.as_reference() as ref:
        method = Conscience().review(ref, tok, prompt_ids, responses)
        first = ShuffledControl(shuffle_seed=5).review(ref, tok, prompt_ids, responses)
        again = ShuffledControl(shuffle_seed=5).review(ref, tok, prompt_ids, responses)
        other = ShuffledControl(shuffle_seed=6).review(ref, tok, prompt_ids, responses)
    for group in (slice(0, 4), slice(4, 8)):  # each prompt keeps its own scores, so its pairs' gaps
        assert sorted(first.scores[group].tolist()) == sorted(method.scores[group].tolist())
    assert not torch.equal(first.scores, method.scores)  # seed 5 moves at least one answer's verdict
    torch.testing.assert_close(first.scores, again.scores)
    assert not torch.equal(first.scores, other.scores)
    torch.testing.assert_close(first.ref_logps, method.ref_logps)


def test_harmful_prompt_sets_split_by_prompt_across_every_theme():
    train, heldout = load_prompts("embedded:harmful_train"), load_prompts("embedded:harmful_heldout")
    assert (len(train), len(heldout)) == (80, 40)
    assert not {p[-1]["content"] for p in train} & {p[-1]["content"] for p in heldout}
    themes = {name: [json.loads(line)["theme"] for line in embedded_chat_path(name).open()]
              for name in ("harmful_train", "harmful_heldout")}
    assert set(themes["harmful_train"]) == set(themes["harmful_heldout"])
    assert len(set(themes["harmful_heldout"])) == 8
