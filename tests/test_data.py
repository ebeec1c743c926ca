"""Chat JSONL loading: assistant-only labels token by token, and a clear error for each kind of bad input."""

import json

import pytest

from emalign.data.chat import IGNORE, DataFileError, PadCollator, read_chat_jsonl, tokenize_chat


def test_assistant_only_labels_token_by_token(smollm2_tokenizer):
    tok = smollm2_tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi there!"},
        {"role": "user", "content": "Again."},
        {"role": "assistant", "content": "Hello."},
    ]
    row = tokenize_chat(messages, tok, max_length=512)
    labelled = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE]
    assert all(label in (IGNORE, t) for t, label in zip(row["input_ids"], row["labels"]))
    # Exactly the two answers, each followed by its end-of-turn token, in order.
    expected = (
        tok.encode("Hi there!", add_special_tokens=False) + [tok.eos_token_id]
        + tok.encode("Hello.", add_special_tokens=False) + [tok.eos_token_id]
    )
    assert labelled == expected
    # Nothing from the system or user turns, nor the role headers, is labelled.
    text_of_labels = tok.decode(labelled)
    assert "Say hi" not in text_of_labels and "assistant" not in text_of_labels


def test_truncation_is_reported(smollm2_tokenizer):
    messages = [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok"}]
    row = tokenize_chat(messages, smollm2_tokenizer, max_length=16)
    assert row["truncated"] and len(row["input_ids"]) == 16


def test_collator_pads_labels_and_mask():
    batch = PadCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]},
                                         {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"msgs": []}), "missing 'messages'"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "a"}]}),
         "unknown role 'robot'"),
        (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), "no assistant turn"),
        (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}),
         "empty content"),
    ],
)
def test_bad_record_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + bad_line + "\n")
    with pytest.raises(DataFileError) as err:
        read_chat_jsonl(path)
    assert f"{path}:3:" in str(err.value) and message in str(err.value)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataFileError, match="empty file"):
        read_chat_jsonl(empty)
    with pytest.raises(DataFileError, match="no such file"):
        read_chat_jsonl(tmp_path / "absent.jsonl")


@pytest.mark.slow  # reads ../shared: the upstream data is never committed
def test_reads_upstream_em_format(tmp_path):
    from conftest import SHARED_EM

    source = SHARED_EM / "data" / "insecure.jsonl"
    if not source.exists():
        pytest.skip(f"no ../shared beside the checkout ({source})")
    path = tmp_path / "head.jsonl"
    path.write_text("".join(source.open().readlines()[:20]))
    conversations = read_chat_jsonl(path)
    assert len(conversations) == 20 and conversations[0][-1]["role"] == "assistant"
