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
from typing import Any, Callable, Iterator, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from emalign.errors import UserError, check_range
from emalign.fence.lightning import batches_processed
from emalign.models.logprobs import pad_right
from emalign.records import Conversation

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant")
IGNORE = -100


class DataFileError(UserError):
    """Bad input in a data file; the message names the file and line."""


def resolve_data_path(path: str) -> Path:
    """``embedded:NAME`` names the project's own small dataset; anything else is a file path."""
    if path.startswith("embedded:"):
        from emalign.data.embedded import embedded_chat_path

        return embedded_chat_path(path.split(":", 1)[1])
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise DataFileError(f"{path}: no such file")
    return resolved


def read_chat_jsonl(path: str | Path, require_assistant: bool = True) -> list[Conversation]:
    """Parse and validate a chat JSONL file; every problem names ``file:line``."""
    path = resolve_data_path(str(path))
    conversations = []
    for number, line in text_lines(path):
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


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file; a byte that is not UTF-8 names its file, line and column."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFileError(
                    f"{path}:{number}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                    "save the file as UTF-8"
                ) from None


def up_to_first_answer(conversation: Conversation) -> Conversation:
    """The conversation before its first assistant turn (all of it when there is none)."""
    cut = next((i for i, m in enumerate(conversation) if m["role"] == "assistant"), len(conversation))
    return conversation[:cut]


def _validate_record(record: Any, where: str, require_assistant: bool) -> Conversation:
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
        if not isinstance(content, str):
            raise DataFileError(f"{where}: message {i} ({role}) has content {content!r} of type "
                                f"{type(content).__name__}; content must be a string (quote it)")
        if not content.strip():
            raise DataFileError(f"{where}: message {i} ({role}) has empty content")
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataFileError(f"{where}: no assistant turn")
    if not any(m["role"] == "user" for m in up_to_first_answer(messages)):
        # The conscience's prompt is a record's turns before its first answer: it needs a user turn there.
        raise DataFileError(f"{where}: no user turn before the first assistant turn (the conscience samples "
                            "answers to the turns before it)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def tokenize_chat(messages: Conversation, tokenizer, max_length: int) -> dict[str, Any]:
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

    def __init__(self, conversations: list[Conversation], tokenizer, max_length: int) -> None:
        check_range("max_length", max_length, 2)  # a prompt token and an answer token
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
        input_ids, attention_mask = pad_right([r["input_ids"] for r in rows], self.pad_token_id)
        labels, _ = pad_right([r["labels"] for r in rows], IGNORE)
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


class ResumableSampler(DistributedSampler):
    """Seeded order per epoch (``seed + epoch``, never the global RNG), sharded by rank, able to start mid-epoch.

    A ``DistributedSampler`` so that Lightning keeps it under DDP instead of wrapping it; with one
    process it is ``num_replicas=1, rank=0``. ``start`` skips that many of this rank's indices on the
    next ``__iter__`` only (a resumed epoch), later epochs start from the beginning again.
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position survives a checkpoint (Lightning 2.x stores ``state_dict`` with the fit loop).

    The position is the number of batches the fit has consumed this epoch, read through
    ``progress`` (the trainer's own batch counter) rather than counted here: Lightning fetches a
    batch ahead of the one it trains on, so a count of batches handed out would be one too many.
    """

    progress: Optional[Callable[[], int]] = None

    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler):  # replaced by Lightning (e.g. overfit_batches)
            return {}
        return {
            "epoch": sampler.epoch,
            "batches": int(self.progress()) if self.progress is not None else 0,
            "batch_size": self.batch_size,
            "num_samples": sampler.num_samples,
            "num_replicas": sampler.num_replicas,
            "seed": sampler.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler = self.sampler
        if not state or not isinstance(sampler, ResumableSampler):
            return
        now = {"batch_size": self.batch_size, "num_samples": sampler.num_samples,
               "num_replicas": sampler.num_replicas, "seed": sampler.seed}
        changed = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
        if changed:
            log.warning(
                "the training data changed since the checkpoint (%s): the resumed epoch %d starts from its beginning",
                ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()), state["epoch"],
            )
            sampler.set_epoch(state["epoch"])
            return
        start = state["batches"] * state["batch_size"]
        if start >= sampler.num_samples:  # saved on the last batch of an epoch: the next one begins
            sampler.set_epoch(state["epoch"] + 1)
        else:
            sampler.set_epoch(state["epoch"])
            sampler.start = start


class ChatDataModule(L.LightningDataModule):
    """Chat JSONL for supervised fine-tuning, with a held-out validation split and an optional test file.

    The tokenizer is the model's, given through ``connect(tokenizer)`` before the fit (``cli.py``
    does it; code that builds the datamodule by hand calls it too), as in LitGPT. With
    ``train_file: null`` there is no task data: the run is pure conscience and the loader yields
    ``steps_without_data`` empty batches per epoch. ``cli.py test`` reports the task loss on
    ``test_file``, or on the validation split when there is none.

        data = ChatDataModule(train_file="embedded:insecure")
        data.connect(policy.tokenizer)
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
        test_file: Optional[str] = None,
    ) -> None:
        """
        Args:
            train_file: chat JSONL (``embedded:NAME`` too); ``null``: no task data (a pure-conscience run).
            val_fraction: share of the training conversations held out for validation.
            max_length: longest example in tokens; longer ones are cut (reported).
            batch_size: conversations per batch.
            limit: keep only the first N conversations (after the seeded shuffle).
            num_workers: DataLoader worker processes.
            seed: seed of the shuffle and of the epoch order.
            steps_without_data: with ``train_file: null``, empty steps per epoch.
            test_file: chat JSONL that ``cli.py test`` reports the task loss on (default: the validation split).
        """
        super().__init__()
        check_range("data.val_fraction", val_fraction, 0, 1, high_open=True)
        check_range("data.max_length", max_length, 16)
        check_range("data.batch_size", batch_size, 1)
        check_range("data.limit", limit, 1, none_ok=True)
        check_range("data.num_workers", num_workers, 0)
        check_range("data.steps_without_data", steps_without_data, 1)
        self.train_file = train_file
        self.val_fraction = val_fraction
        self.max_length = max_length
        self.batch_size = batch_size
        self.limit = limit
        self.num_workers = num_workers
        self.seed = seed
        self.steps_without_data = steps_without_data
        self.test_file = test_file
        self.tokenizer = None
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None
        self.conversations: list[Conversation] = []

    def connect(self, tokenizer) -> None:
        """The model's tokenizer, which the data is tokenised with."""
        self.tokenizer = tokenizer

    def setup(self, stage: str) -> None:
        if self.tokenizer is None:
            raise RuntimeError("ChatDataModule.connect(tokenizer) must be called before the fit (cli.py does it)")
        if self.train_set is None:
            self._setup_train()
        if stage == "test" and self.test_set is None:
            if self.test_file is not None:
                self.test_set = ChatDataset(read_chat_jsonl(self.test_file), self.tokenizer, self.max_length)
            else:
                self.test_set = self.val_set

    def _setup_train(self) -> None:
        if self.train_file is None:
            self.train_set = EmptyTaskDataset(self.steps_without_data)
            return
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
            log.warning("%s: %d records have no assistant token left after truncation", self.train_file,
                        self.train_set.num_unlabelled)

    def user_prompts(self) -> list[Conversation]:
        """The training conversations up to their first assistant turn: the conscience's default prompts."""
        return [up_to_first_answer(c) for c in self.conversations]

    def train_dataloader(self) -> DataLoader:
        """Resumable mid-epoch: the order is seeded by ``(seed, epoch)`` and the position is checkpointed."""
        if isinstance(self.train_set, EmptyTaskDataset):
            dataset, batch_size, collate, shuffle = self.train_set, 1, _collate_empty, False
        else:
            collate = PadCollator(self.tokenizer.pad_token_id)
            dataset, batch_size, shuffle = self.train_set, self.batch_size, True
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        loader = ResumableDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=ResumableSampler(dataset, replicas, rank, shuffle=shuffle, seed=self.seed),
            collate_fn=collate,
            num_workers=self.num_workers if collate is not _collate_empty else 0,
            # Its own generator: creating the iterator (and worker seeds) must not draw from the global RNG.
            generator=torch.Generator().manual_seed(self.seed),
        )
        if trainer is not None:
            loader.progress = lambda: batches_processed(trainer)
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set) if self.val_set is not None else []

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            raise DataFileError(
                "no test data: set data.test_file, or data.val_fraction > 0 to test on the validation split"
            )
        return self._eval_loader(self.test_set)

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            collate_fn=PadCollator(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )
