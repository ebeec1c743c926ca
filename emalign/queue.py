"""PairQueue: preference pairs waiting to be trained on.

Bounded (oldest evicted first) and aged (pairs produced more than ``max_age`` optimizer steps ago
are dropped: they came from a policy that no longer exists). Sampling is seeded by the step, so a
resumed run draws the same pairs as an uninterrupted one. Round-trips through ``state_dict``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from emalign.conscience import Pair


class PairQueue:
    def __init__(self, capacity: int = 256, max_age: int = 64, seed: int = 0) -> None:
        """
        Args:
            capacity: most pairs held; the oldest go first.
            max_age: pairs older than this many steps are dropped before sampling.
            seed: base seed of the per-step sampling generator.
        """
        if capacity < 1:
            raise ValueError(f"PairQueue.capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.max_age = max_age
        self.seed = seed
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
        self.pairs = [p for p in self.pairs if step - p.step <= self.max_age]

    def sample(self, n: int, step: int, draw: int = 0) -> list[Pair]:
        """Up to ``n`` distinct pairs, drawn uniformly with a generator seeded by ``(seed, step, draw)``.

        ``draw`` tells apart the micro-batches of one optimizer step (gradient accumulation), which
        would otherwise all train on the same pairs.
        """
        self.expire(step)
        if not self.pairs:
            return []
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1_009 + draw)
        order = torch.randperm(len(self.pairs), generator=generator)[:n].tolist()
        return [self.pairs[i] for i in order]

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "max_age": self.max_age, "seed": self.seed, "pairs": [asdict(p) for p in self.pairs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pairs = [Pair(**p) for p in state["pairs"]][-self.capacity :]
