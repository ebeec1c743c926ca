"""The datatypes the conscience step passes around: a rollout, a review of rollouts, a preference pair.

They live here, apart from the code that makes them, so that the queue and the module can hold
pairs without importing the scorer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Conversation = list[dict[str, str]]


@dataclass
class Rollout:
    """One sampled answer, as token ids (exactly what the model produced) and text."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    finished: bool
    revised: bool = False


@dataclass
class Review:
    scores: torch.Tensor
    """log P(yes) - log P(no) per conversation."""
    ref_logps: torch.Tensor
    """Summed reference log-probs of each response's tokens."""


@dataclass
class Pair:
    """One preference pair with its frozen reference log-probs (exact: the reference never changes)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    ref_chosen: float
    ref_rejected: float
    chosen_score: float
    rejected_score: float
    step: int
    revised: bool = False
    chosen_index: int = -1
    """Index of the chosen rollout in its conscience step's rollouts (-1: unknown, e.g. made by hand)."""
    rejected_index: int = -1
    """Index of the rejected rollout in its conscience step's rollouts."""
    uses: int = 0
    """Times the queue has handed this pair out for training (see ``PairQueue.max_uses``)."""
