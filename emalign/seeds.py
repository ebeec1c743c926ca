"""Seeds derived from a base seed and the coordinates of a draw (rank, step, prompt, sample, ...).

One home for every derivation, so that no two places mix the same parts differently. The values
are those the earlier inline formulas gave, so recorded runs keep reproducing.
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional


def mix_seed(seed: int, *parts: int, multiplier: int = 1_000_003) -> int:
    """``seed`` folded with ``parts`` as digits of base ``multiplier``: cheap, and distinct for small parts."""
    for part in parts:
        seed = seed * multiplier + part
    return seed


def sample_seed(seed: int, step: int, prompt_index: int, sample_index: int) -> int:
    """One sample's seed, hashed so that neighbouring samples' generators are unrelated."""
    digest = hashlib.blake2b(f"{seed}:{step}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def fit_seed(seed: Optional[int]) -> int:
    """``seed``, or else the one the fit's ``seed_everything`` set (Lightning publishes it in ``PL_GLOBAL_SEED``;
    0 when unset): so that one flag moves a whole run."""
    return seed if seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
