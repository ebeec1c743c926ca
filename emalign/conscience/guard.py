"""The coherence guard: an answer cannot win on the ethics question alone.

The conscience's verdict (log P(yes) - log P(no) on "was that ethical?") rewards text the reviewer
cannot find fault with, and on a small model incoherent text often scores higher than a plain
answer (a random string says nothing unethical). So a replacement, a revision at inference or the
chosen answer of a training pair, must also still read as an answer to the reference: its mean
log-probability per token under the reference may fall at most ``max_logp_drop`` nats below that
of the answer it replaces, and it must say something.

    guard = CoherenceGuard(max_logp_drop=1.0)
    per_token = mean_logps(review.ref_logps, [len(r.response_ids) for r in rollouts])
    guard.allows(per_token[original], per_token[replacement], rollouts[replacement].text)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from emalign.errors import check_range


@dataclass(frozen=True)
class CoherenceGuard:
    """Lets an answer replace another only when the reference finds it about as likely, per token."""

    max_logp_drop: float = 1.0
    """Most the reference's mean log-prob per token (nats) may fall from the replaced answer to its
    replacement. Sampled chat answers sit within a few tenths of each other; a string of random
    tokens falls by several nats."""

    def __post_init__(self) -> None:
        check_range("max_logp_drop", self.max_logp_drop, 0)

    def allows(self, replaced_logp: float, replacement_logp: float, replacement_text: str) -> bool:
        """True when the replacement answers (non-blank) and is not far less likely per token."""
        return bool(replacement_text.strip()) and replacement_logp >= replaced_logp - self.max_logp_drop


def mean_logps(summed: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Per-token mean of summed log-probs (an empty response gives 0; ``allows`` refuses it as blank)."""
    return summed / torch.tensor([max(1, n) for n in lengths], dtype=summed.dtype)
