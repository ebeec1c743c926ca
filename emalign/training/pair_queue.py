"""PairQueue: preference pairs waiting to be trained on.

Bounded (oldest evicted first) and aged (pairs produced more than ``max_age`` optimizer steps ago
are dropped: they came from a policy that no longer exists). With ``max_uses`` a pair is trained
on at most that many draws, then dropped (a replay limit; ``None``: no limit). Sampling is seeded
by the step, so a resumed run draws the same pairs as an uninterrupted one. Round-trips through
``state_dict``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Optional

import torch

from emalign.errors import check_range
from emalign.records import Pair
from emalign.seeds import mix_seed


class PairQueue:
    def __init__(
        self, capacity: int = 256, max_age: int = 64, seed: int = 0, max_uses: Optional[int] = None
    ) -> None:
        """
        Args:
            capacity: most pairs held; the oldest go first.
            max_age: pairs older than this many steps are dropped before sampling.
            seed: base seed of the per-step sampling generator.
            max_uses: each pair is drawn for training at most this many times (``None``: no limit).
        """
        check_range("model.pair_queue.capacity", capacity, 1)
        check_range("model.pair_queue.max_age", max_age, 0)
        check_range("model.pair_queue.max_uses", max_uses, 1, none_ok=True)
        self.capacity = capacity
        self.max_age = max_age
        self.seed = seed
        self.max_uses = max_uses
        self.pairs: list[Pair] = []

    def __len__(self) -> int:
        return len(self.pairs)

    def put(self, pairs: list[Pair], step: int) -> int:
        for pair in pairs:
            pair.step = step
        self.pairs.extend(pairs)
        overflow = len(self.pairs) - self.capacity
        if overflow > 0:
            del self.pairs[:overflow]
        return len(pairs)

    def expire(self, step: int) -> None:
        """Drop pairs older than ``max_age`` and those drawn ``max_uses`` times already."""
        self.pairs = [p for p in self.pairs if step - p.step <= self.max_age]
        if self.max_uses is not None:
            self.pairs = [p for p in self.pairs if p.uses < self.max_uses]

    def sample(self, n: int, step: int, draw: int = 0) -> list[Pair]:
        """Up to ``n`` distinct pairs, drawn uniformly with a generator seeded by ``(seed, step, draw)``.

        ``draw`` tells apart the micro-batches of one optimizer step (gradient accumulation), which
        would otherwise all train on the same pairs.
        """
        self.expire(step)
        if not self.pairs:
            return []
        generator = torch.Generator().manual_seed(mix_seed(mix_seed(self.seed, step), draw, multiplier=1009))
        order = torch.randperm(len(self.pairs), generator=generator)[:n].tolist()
        drawn = [self.pairs[i] for i in order]
        for pair in drawn:
            pair.uses += 1
        return drawn

    def state_dict(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity, "max_age": self.max_age, "seed": self.seed, "max_uses": self.max_uses,
            "pairs": [asdict(p) for p in self.pairs],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pairs = [Pair(**p) for p in state["pairs"]][-self.capacity :]
