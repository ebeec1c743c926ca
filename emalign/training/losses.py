"""Preference losses of the alignment term (the task loss is ``emalign.models.logprobs.mean_token_nll``).

Every preference loss takes summed sequence log-probs of the policy and the frozen reference for
chosen and rejected responses and returns ``(losses, chosen_rewards, rejected_rewards)``, one value
per pair, with rewards ``beta * (log pi - log ref)`` as in DPO. A loss with ``length_normalized``
set gets per-token average log-probs instead (the module divides by each response's length).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from emalign.errors import check_range


class PreferenceLoss(nn.Module):
    """Base class: ``forward(pi_chosen, pi_rejected, ref_chosen, ref_rejected)``."""

    length_normalized: bool = False
    """Whether the log-probs it receives are per-token averages rather than sums."""

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        check_range("model.preference_loss.beta", beta, 0, low_open=True)
        self.beta = beta

    def rewards(self, pi_chosen, pi_rejected, ref_chosen, ref_rejected):
        chosen = self.beta * (pi_chosen - ref_chosen)
        rejected = self.beta * (pi_rejected - ref_rejected)
        return chosen, rejected

    def logits(self, pi_chosen, pi_rejected, ref_chosen, ref_rejected) -> torch.Tensor:
        """h = (log pi_c - log ref_c) - (log pi_r - log ref_r), unscaled."""
        return (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)


class SigmoidDPO(PreferenceLoss):
    """DPO (Rafailov et al. 2023, arXiv 2305.18290): ``-log sigmoid(beta * h)``."""

    def forward(self, pi_chosen, pi_rejected, ref_chosen, ref_rejected):
        h = self.logits(pi_chosen, pi_rejected, ref_chosen, ref_rejected)
        losses = -F.logsigmoid(self.beta * h)
        return (losses, *self.rewards(pi_chosen, pi_rejected, ref_chosen, ref_rejected))


class IPO(PreferenceLoss):
    """IPO (Azar et al. 2023, arXiv 2310.12036): ``(h - 1 / (2 * beta))^2``.

    ``h`` uses summed sequence log-probs, as in the paper's formulation of the pairwise loss. With
    ``length_normalized`` it uses per-token averages, as TRL's ``loss_type="ipo"`` does, so that a
    ``beta`` tuned with TRL means the same here.
    """

    def __init__(self, beta: float = 0.1, length_normalized: bool = False) -> None:
        """
        Args:
            beta: the regularisation strength; the target margin is ``1 / (2 * beta)``.
            length_normalized: average log-probs over each response's tokens (TRL's IPO) instead of summing.
        """
        super().__init__(beta)
        self.length_normalized = length_normalized

    def forward(self, pi_chosen, pi_rejected, ref_chosen, ref_rejected):
        h = self.logits(pi_chosen, pi_rejected, ref_chosen, ref_rejected)
        losses = (h - 1 / (2 * self.beta)) ** 2
        return (losses, *self.rewards(pi_chosen, pi_rejected, ref_chosen, ref_rejected))


class HingeDPO(PreferenceLoss):
    """Hinge / SLiC (Zhao et al. 2023, arXiv 2305.10425): ``max(0, 1 - beta * h)``."""

    def forward(self, pi_chosen, pi_rejected, ref_chosen, ref_rejected):
        h = self.logits(pi_chosen, pi_rejected, ref_chosen, ref_rejected)
        losses = torch.relu(1 - self.beta * h)
        return (losses, *self.rewards(pi_chosen, pi_rejected, ref_chosen, ref_rejected))


class RobustDPO(PreferenceLoss):
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409) for labels flipped with probability ``eps``:

    ``[-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps)``.
    Self-review verdicts are noisy labels, which is what this loss is for.
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.1) -> None:
        super().__init__(beta)
        check_range("model.preference_loss.label_smoothing", label_smoothing, 0, 0.5, high_open=True)
        self.label_smoothing = label_smoothing

    def forward(self, pi_chosen, pi_rejected, ref_chosen, ref_rejected):
        h = self.beta * self.logits(pi_chosen, pi_rejected, ref_chosen, ref_rejected)
        eps = self.label_smoothing
        losses = (-(1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1 - 2 * eps)
        return (losses, *self.rewards(pi_chosen, pi_rejected, ref_chosen, ref_rejected))
