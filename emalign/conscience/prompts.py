"""Where the conscience's prompts come from.

``TrainingPrompts``: the user turns of the fit's own training data (the default).
``FilePrompts``: a file — chat JSONL (each conversation up to its first assistant turn, e.g. the
user turns of EM's jailbroken.jsonl) or plain text (one prompt per line).
Draws are seeded by ``(seed, step)``, so reruns see the same prompts.
"""

from __future__ import annotations

from typing import Optional

import torch

from emalign.errors import UserError
from emalign.records import Conversation
from emalign.seeds import mix_seed


class PromptSourceError(UserError):
    pass


class PromptSource:
    """Base class. Subclasses fill ``self.prompts`` in ``bind``."""

    def __init__(self) -> None:
        self.prompts: list[Conversation] = []

    def bind(self, trainer) -> None:
        """Called once when fit starts."""

    def draw(self, n: int, step: int, seed: int = 0) -> list[tuple[int, Conversation]]:
        if not self.prompts:
            raise PromptSourceError(f"{type(self).__name__}: no prompts to draw from")
        generator = torch.Generator().manual_seed(mix_seed(seed, step))
        order = torch.randperm(len(self.prompts), generator=generator)[:n].tolist()
        return [(i, self.prompts[i]) for i in order]


class TrainingPrompts(PromptSource):
    """The training conversations up to their first assistant turn."""

    def bind(self, trainer) -> None:
        from emalign.data.chat import ChatDataModule  # here: data imports Lightning, which inference does not need

        datamodule = trainer.datamodule
        if not isinstance(datamodule, ChatDataModule):
            raise PromptSourceError("TrainingPrompts needs a ChatDataModule; with no task data, use FilePrompts")
        self.prompts = datamodule.user_prompts()
        if not self.prompts:
            raise PromptSourceError(
                "TrainingPrompts: the training data has no prompts (train_file: null?); use FilePrompts"
            )


class FilePrompts(PromptSource):
    def __init__(
        self, path: str = "embedded:insecure", limit: Optional[int] = None, system: Optional[str] = None
    ) -> None:
        """
        Args:
            path: chat JSONL (``embedded:NAME`` too) or a text file with one prompt per line.
            limit: keep only the first N prompts.
            system: a system prompt put before every prompt that has none.
        """
        super().__init__()
        self.path = path
        self.limit = limit
        self.system = system
        self.prompts = load_prompts(path, limit, system)

    def bind(self, trainer) -> None:
        pass


def load_prompts(path: str, limit: Optional[int] = None, system: Optional[str] = None) -> list[Conversation]:
    from emalign.data.chat import read_chat_jsonl, resolve_data_path, text_lines, up_to_first_answer

    resolved = resolve_data_path(path)
    if resolved.suffix == ".jsonl":
        prompts = [up_to_first_answer(c) for c in read_chat_jsonl(resolved, require_assistant=False)]
        prompts = [p for p in prompts if p and p[-1]["role"] == "user"]
    else:
        prompts = [[{"role": "user", "content": line.strip()}] for _, line in text_lines(resolved) if line.strip()]
    if system:
        prompts = [p if p[0]["role"] == "system" else [{"role": "system", "content": system}] + p for p in prompts]
    prompts = prompts[:limit] if limit else prompts
    if not prompts:
        raise PromptSourceError(f"{path}: no prompts (a JSONL needs user turns; a text file, non-empty lines)")
    return prompts

