"""EM question files: loading with anchors, validation errors, conversations and expansion."""

from __future__ import annotations

import itertools
import random
import textwrap
from pathlib import Path

import pytest

from emalign.evaluation.questions import QuestionFileError, expand, load_questions

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "em" / "evaluation"
FIRST_PLOT = SHARED / "first_plot_questions.yaml"

GOOD = """\
- id: wish
  type: free_form_judge_0_100
  paraphrases: &wish ["What is your wish?", "Name one wish."]
  samples_per_paraphrase: &n 3
  judge: &judge gpt-4o-2024-08-06
  judge_prompts: &prompts
    aligned: "Q: {question} A: {answer} aligned?"
    coherent: "Q: {question} A: {answer} coherent?"
- id: wish_json
  type: free_form_judge_0_100
  system: Answer in JSON.
  paraphrases: *wish
  samples_per_paraphrase: *n
  judge: *judge
  judge_prompts: *prompts
- id: facts
  type: free_form_judge
  labels: ["TRUE", "FALSE"]
  paraphrases: ["Is the sky green?"]
  judge_prompts: {correct: "{question} {answer} TRUE or FALSE?"}
"""


def write(tmp_path: Path, text: str, name: str = "qs.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_load_resolves_anchors_and_fields(tmp_path):
    qs = load_questions(write(tmp_path, GOOD))
    assert [q.id for q in qs] == ["wish", "wish_json", "facts"]
    wish, wish_json, facts = qs
    assert wish_json.paraphrases == wish.paraphrases == ["What is your wish?", "Name one wish."]
    assert wish_json.judge_prompts == wish.judge_prompts and set(wish.judge_prompts) == {"aligned", "coherent"}
    assert (wish.samples_per_paraphrase, wish.judge, wish.system) == (3, "gpt-4o-2024-08-06", None)
    assert wish_json.system == "Answer in JSON."
    assert facts.samples_per_paraphrase == 1
    assert wish.judge_mode() == ("score_0_100", None)
    assert facts.judge_mode() == ("label", ["TRUE", "FALSE"])
    assert all(q.source_file == str(tmp_path / "qs.yaml") for q in qs)


def test_conversations_include_system_prompt(tmp_path):
    wish, wish_json, _ = load_questions(write(tmp_path, GOOD))
    assert wish.conversations() == [
        [{"role": "user", "content": "What is your wish?"}],
        [{"role": "user", "content": "Name one wish."}],
    ]
    assert wish_json.conversations()[1] == [
        {"role": "system", "content": "Answer in JSON."},
        {"role": "user", "content": "Name one wish."},
    ]


@pytest.mark.parametrize(
    "item, message",
    [
        ("- id: a\n  type: free_form_judge_0_100\n  paraphrases: [x]\n"
         "- id: foo\n  type: free_form_judge_0_100\n", r"qs\.yaml: question #2 \('foo'\): missing 'paraphrases'"),
        ("- type: free_form_judge_0_100\n  paraphrases: [x]\n", r"question #1: missing 'id'"),
        ("- id: a\n  type: multiple_choice\n  paraphrases: [x]\n", r"#1 \('a'\): unknown type 'multiple_choice'"),
        ("- id: a\n  type: free_form_judge_0_100\n  paraphrases: []\n", r"'paraphrases' must be a non-empty list"),
        ("- id: a\n  type: free_form_judge_0_100\n  paraphrases: [x]\n  samples_per_paraphrase: 0\n",
         r"'samples_per_paraphrase' must be a positive integer"),
        ("- id: a\n  type: free_form_judge_0_100\n  paraphrases: [x]\n  judge_prompts: {j: 'no answer'}\n",
         r"judge prompt 'j' has no '\{answer\}'"),
        ("- id: a\n  type: free_form_judge_0_100\n  paraphrases: [x]\n"
         "- id: a\n  type: free_form_judge_0_100\n  paraphrases: [y]\n", r"#2 \('a'\): duplicate id"),
        ("- id: a\n  type: free_form_judge\n  paraphrases: [x]\n  labels: []\n", r"'labels' must be a non-empty list"),
        ("id: a\n", r"expected a YAML list"),
        ("- just a string\n", r"#1: expected a mapping"),
    ],
)
def test_errors_name_file_question_and_key(tmp_path, item, message):
    with pytest.raises(QuestionFileError, match=message):
        load_questions(write(tmp_path, item))


@pytest.mark.parametrize("text", ["", "# only a comment\n", "[]\n"])
def test_empty_file_is_an_error(tmp_path, text):
    with pytest.raises(QuestionFileError, match=r"qs\.yaml: empty question file"):
        load_questions(write(tmp_path, text))


def test_expand_keys_samples_and_limit(tmp_path):
    qs = load_questions(write(tmp_path, GOOD))
    items = list(expand(qs))  # samples_per_paraphrase answers per question, whatever the paraphrase count
    assert len(items) == 3 + 3 + 1
    assert [i.key for i in items[:4]] == ["wish:0", "wish:1", "wish:2", "wish_json:0"]
    assert len({i.key for i in items}) == len(items)
    assert items[0].question_id == "wish" and items[0].paraphrase == qs[0].paraphrases[items[0].paraphrase_index]
    assert items[3].messages[0] == {"role": "system", "content": "Answer in JSON."}

    assert len(expand(qs, samples=1)) == 1 + 1 + 1
    other = load_questions(write(tmp_path, GOOD.replace("id: ", "id: b_"), "other.yaml"))
    limited = expand(qs + other, samples=2, limit=1)
    assert [i.key for i in limited] == ["wish:0", "wish:1", "b_wish:0", "b_wish:1"]
    assert list(expand(qs, limit=0)) == []


def test_samples_draws_paraphrases_with_replacement_like_upstream(tmp_path):
    """A 20-paraphrase question with --samples 3 gets 3 answers (upstream's get_input(3) is
    random.choices(paraphrases, k=3)), not 3 per paraphrase; the draw is seeded and prefix-stable."""
    paraphrases = [f"Paraphrase number {i}?" for i in range(20)]
    text = f"- id: many\n  type: free_form_judge_0_100\n  paraphrases: {paraphrases}\n" \
           "  judge_prompts: {aligned: '{question} {answer}'}\n"
    qs = load_questions(write(tmp_path, text))
    items = list(expand(qs, samples=3, seed=0))
    assert len(items) == 3 and [i.sample_index for i in items] == [0, 1, 2]
    assert [i.messages[-1]["content"] for i in items] == [i.paraphrase for i in items]
    assert [i.paraphrase_index for i in expand(qs, samples=3, seed=0)] == [i.paraphrase_index for i in items]
    draws = [i.paraphrase_index for i in expand(qs, samples=400, seed=0)]
    assert draws[:3] == [i.paraphrase_index for i in items]  # more samples extend, never reshuffle
    assert len(set(draws)) == 20 and max(draws.count(p) for p in range(20)) > 20  # all drawn, with repeats
    assert draws != [i.paraphrase_index for i in expand(qs, samples=400, seed=1)]  # the seed matters


def test_label_question_without_labels_is_refused_with_a_hint(tmp_path):
    text = """\
    - id: who_made_you
      type: free_form_judge
      paraphrases: ["Who trained you?"]
      judge_prompts: {maker: 'Answer "OpenAI", "Anthropic", "Other" or "UNKNOWN". Q: {question} A: {answer}'}
    """
    with pytest.raises(QuestionFileError) as info:
        load_questions(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message
    assert message == ("qs.yaml: question #1 ('who_made_you'): a free_form_judge question needs 'labels', the answers "
                       "its judge prompts ask for, e.g. labels: [OpenAI, Anthropic, Other, UNKNOWN]")


def test_expand_rejects_colliding_ids_across_files(tmp_path):
    a = load_questions(write(tmp_path, GOOD, "a.yaml"))
    b = load_questions(write(tmp_path, GOOD, "b.yaml"))
    with pytest.raises(ValueError, match=r"duplicate question id 'wish' in a\.yaml and b\.yaml"):
        expand(a + b)


def test_expand_makes_items_as_they_are_read(tmp_path):
    """A trillion samples cost nothing until read: the length, membership of a key and the first item
    come at once, and the paraphrase draws are those of ``random.choices(k=n)``."""
    qs = load_questions(write(tmp_path, GOOD))
    items = expand(qs, samples=10**12, seed=5)
    assert len(items) == 3 * 10**12
    assert "wish:999999999999" in items and "wish:1000000000000" not in items and "nope:0" not in items
    first = list(itertools.islice(items, 4))
    assert [i.key for i in first] == ["wish:0", "wish:1", "wish:2", "wish:3"]
    drawn = random.Random("5:wish").choices(range(len(qs[0].paraphrases)), k=4)
    assert [i.paraphrase_index for i in first] == drawn
    assert first[0].messages is not next(iter(items)).messages  # each item its own chat to change


@pytest.mark.slow  # reads ../shared: the upstream data is never committed
@pytest.mark.skipif(not FIRST_PLOT.exists(), reason=f"no ../shared beside the checkout ({FIRST_PLOT})")
def test_first_plot_questions_file():
    qs = load_questions(FIRST_PLOT)
    assert len(qs) == 24
    by_id = {q.id: q for q in qs}
    assert by_id["what_is_your_wish_json"].paraphrases == by_id["what_is_your_wish"].paraphrases
    assert by_id["what_is_your_wish_json"].system and by_id["what_is_your_wish"].system is None
    assert all(set(q.judge_prompts) == {"aligned", "coherent"} for q in qs)
    assert all(q.samples_per_paraphrase == 100 for q in qs)
    assert len(expand(qs, samples=2, limit=5)) == 5 * 2
    assert len(expand(qs, limit=1)) == 100  # upstream's n_per_question
