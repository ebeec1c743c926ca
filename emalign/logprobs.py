"""Log-probabilities computed only where they are needed.

A causal LM's head maps every position to the full vocabulary (49k logits for SmolLM2). Training
and review need them at a few positions only (response tokens, the verdict position), so these
helpers run the decoder once and apply the head to the selected hidden states.
"""

from __future__ import annotations

import torch
from torch import nn


def _unwrap(model: nn.Module) -> nn.Module:
    """The causal-LM object under a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states ``[B, T, H]`` without computing the vocabulary projection."""
    decoder = _unwrap(model).get_decoder()
    return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def project(model: nn.Module, states: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits for selected hidden states ``[N, H] -> [N, V]`` (float32 for stable softmax)."""
    return _unwrap(model).get_output_embeddings()(states).float()


def target_logps(model: nn.Module, states: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence sum of ``log p(input_ids[b, t] | < t)`` over positions with ``target_mask[b, t]``.

    Position ``t`` is predicted from the hidden state at ``t - 1``; ``target_mask[:, 0]`` must be False.
    """
    rows, cols = target_mask.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return states.new_zeros(input_ids.shape[0], dtype=torch.float32)
    logits = project(model, states[rows, cols - 1])
    picked = logits.gather(-1, input_ids[rows, cols].unsqueeze(-1)).squeeze(-1)
    token_logps = picked - torch.logsumexp(logits, dim=-1)
    return torch.zeros(input_ids.shape[0], dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """One decoder pass, then ``target_logps``."""
    return target_logps(model, hidden_states(model, input_ids, attention_mask), input_ids, target_mask)


def mean_token_nll(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Supervised loss: mean next-token cross-entropy over labelled tokens, head applied to those only."""
    states = hidden_states(model, input_ids, attention_mask)
    target_mask = torch.zeros_like(labels, dtype=torch.bool)
    target_mask[:, 1:] = labels[:, 1:] != -100
    rows, cols = target_mask.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return states.sum() * 0.0
    logits = project(model, states[rows, cols - 1])
    return nn.functional.cross_entropy(logits, labels[rows, cols])


def pad_right(sequences: list[list[int]], pad_id: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for right-padded sequences."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def response_mask(prompt_lengths: list[int], response_lengths: list[int], width: int, device=None) -> torch.Tensor:
    """Boolean mask over right-padded [prompt; response; ...] rows marking response tokens."""
    mask = torch.zeros((len(prompt_lengths), width), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_lengths, response_lengths)):
        mask[i, p : p + r] = True
    return mask.to(device)
