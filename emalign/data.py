"""Chat JSONL (the upstream Emergent Misalignment format) to training examples with assistant-only labels.

Each line is ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``. The
model's chat template renders the conversation; only tokens inside assistant turns (their end-of-turn
token included, so the model learns to stop) carry labels, everything else is ``-100``.

    dm = ChatDataModule(train_file="embedded:insecure", max_length=512, batch_size=4)
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from emalign.errors import UserError

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant")
IGNORE = -100


class DataFileError(UserError):
    """Bad input in a data file; the message names the file and line."""


def resolve_data_path(path: str) -> Path:
    """``embedded:NAME`` names the project's own small dataset; anything else is a file path."""
    if path.startswith("embedded:"):
        from emalign.embedded import embedded_chat_path

        return embedded_chat_path(path.split(":", 1)[1])
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise DataFileError(f"{path}: no such file")
    return resolved


def read_chat_jsonl(path: str | Path, require_assistant: bool = True) -> list[list[dict[str, str]]]:
    """Parse and validate a chat JSONL file; every problem names ``file:line``."""
    path = resolve_data_path(str(path))
    conversations = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFileError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            conversations.append(_validate_record(record, where, require_assistant))
    if not conversations:
        raise DataFileError(f"{path}: empty file (no records)")
    return conversations


def _validate_record(record: Any, where: str, require_assistant: bool) -> list[dict[str, str]]:
    if not isinstance(record, dict) or "messages" not in record:
        raise DataFileError(f"{where}: missing 'messages' (expected {{\"messages\": [...]}})")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataFileError(f"{where}: 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataFileError(f"{where}: message {i} is not an object")
        role = message.get("role")
        if role not in ROLES:
            raise DataFileError(f"{where}: message {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise DataFileError(f"{where}: message {i} ({role}) has empty content")
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataFileError(f"{where}: no assistant turn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def tokenize_chat(messages: list[dict[str, str]], tokenizer, max_length: int) -> dict[str, Any]:
    """Render with the chat template and label assistant tokens only.

    Assistant spans come from rendering the conversation up to each assistant turn with and without
    it; the character offsets then map onto tokens of the single full rendering, so the labels line
    up with exactly the tokens the model sees.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(through) or not through.startswith(before):
            raise ValueError("chat template is not prefix-stable; assistant spans cannot be located")
        end = len(through.rstrip("\n"))  # the newline after end-of-turn is formatting, not the answer
        spans.append((len(before), end))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoded["input_ids"]
    labels = [IGNORE] * len(input_ids)
    for t, (start, stop) in enumerate(encoded["offset_mapping"]):
        if any(start >= a and stop <= b and stop > start for a, b in spans):
            labels[t] = input_ids[t]
    truncated = len(input_ids) > max_length
    return {
        "input_ids": input_ids[:max_length],
        "labels": labels[:max_length],
        "truncated": truncated,
    }


class ChatDataset(Dataset):
    """Tokenised conversations, built with ``datasets`` so the tokenisation is cached and batched."""

    def __init__(self, conversations: list[list[dict[str, str]]], tokenizer, max_length: int) -> None:
        import datasets

        table = datasets.Dataset.from_list([{"messages": c} for c in conversations])
        self.rows = table.map(
            lambda row: tokenize_chat(row["messages"], tokenizer, max_length),
            remove_columns=["messages"],
            desc="tokenizing",
        )
        self.num_truncated = int(sum(self.rows["truncated"]))
        self.num_unlabelled = int(sum(all(x == IGNORE for x in labels) for labels in self.rows["labels"]))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        row = self.rows[index]
        return {"input_ids": row["input_ids"], "labels": row["labels"]}


@dataclass
class PadCollator:
    """Right-pads a batch; padded positions get label -100 and attention 0."""

    pad_token_id: int

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class EmptyTaskDataset(Dataset):
    """Stands in for task data in pure-conscience runs: each item is one empty step."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return {}


def _collate_empty(rows: list[dict]) -> dict:
    return {}


class ChatDataModule(L.LightningDataModule):
    """Chat JSONL for supervised fine-tuning, with a held-out validation split.

    The tokenizer comes from the LightningModule's policy at ``setup`` (so the data always matches
    the model). With ``train_file: null`` there is no task data: the run is pure conscience and the
    loader yields ``steps_without_data`` empty batches per epoch.
    """

    def __init__(
        self,
        train_file: Optional[str] = "embedded:insecure",
        val_fraction: float = 0.05,
        max_length: int = 512,
        batch_size: int = 4,
        limit: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 0,
        steps_without_data: int = 100,
    ) -> None:
        super().__init__()
        if not 0 <= val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.train_file = train_file
        self.val_fraction = val_fraction
        self.max_length = max_length
        self.batch_size = batch_size
        self.limit = limit
        self.num_workers = num_workers
        self.seed = seed
        self.steps_without_data = steps_without_data
        self.tokenizer = None
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.conversations: list[list[dict[str, str]]] = []

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        if self.train_file is None:
            self.train_set = EmptyTaskDataset(self.steps_without_data)
            return
        if self.tokenizer is None:
            self.tokenizer = self.trainer.lightning_module.policy.tokenizer
        conversations = read_chat_jsonl(self.train_file)
        random.Random(self.seed).shuffle(conversations)
        if self.limit is not None:
            conversations = conversations[: self.limit]
        n_val = int(len(conversations) * self.val_fraction)
        self.conversations = conversations[n_val:]
        self.train_set = ChatDataset(self.conversations, self.tokenizer, self.max_length)
        self.val_set = ChatDataset(conversations[:n_val], self.tokenizer, self.max_length) if n_val else None
        if self.train_set.num_truncated:
            log.warning(
                "%s: %d of %d records truncated to max_length=%d",
                self.train_file, self.train_set.num_truncated, len(self.train_set), self.max_length,
            )
        if self.train_set.num_unlabelled:
            log.warning("%s: %d records have no assistant token left after truncation", self.train_file, self.train_set.num_unlabelled)

    def user_prompts(self) -> list[list[dict[str, str]]]:
        """The training conversations up to their first assistant turn: the conscience's default prompts."""
        prompts = []
        for conversation in self.conversations:
            cut = next(i for i, m in enumerate(conversation) if m["role"] == "assistant")
            prompts.append(conversation[:cut])
        return prompts

    def train_dataloader(self) -> DataLoader:
        if isinstance(self.train_set, EmptyTaskDataset):
            return DataLoader(self.train_set, batch_size=1, collate_fn=_collate_empty)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=PadCollator(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            return []
        return DataLoader(
            self.val_set, batch_size=self.batch_size, collate_fn=PadCollator(self.tokenizer.pad_token_id), num_workers=self.num_workers
        )
