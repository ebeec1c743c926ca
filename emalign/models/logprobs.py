"""Log-probabilities computed only where they are needed, a chunk of positions at a time.

A causal LM's head maps every position to the full vocabulary (49k logits for SmolLM2, 152k for
Qwen2.5). Training and review need them at a few positions only (response tokens, the verdict
position), so these helpers run the decoder once and apply the head to the selected hidden states,
``CHUNK_POSITIONS`` at a time. Under autograd each chunk is checkpointed: the backward recomputes
one chunk's logits at a time instead of keeping ``positions x vocab`` floats alive for it.

``project`` reproduces what the model's own forward does after the head (Gemma's tanh soft-cap,
Cohere's and Granite's scales); ``check_head`` refuses a model whose forward does something else.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from emalign.errors import UserError
from emalign.fence.models import attention_kernel

CHUNK_POSITIONS = 1024
"""Positions projected to the vocabulary at once: at most ``CHUNK_POSITIONS x vocab`` float32 logits
(200 MB at SmolLM2's 49k vocabulary) are alive, forward or backward."""

# What transformers' ``*ForCausalLM.forward`` does to ``lm_head(h)``, by ``config.model_type``
# (read from transformers 5.24's modeling code). The same attribute name means different things in
# different models (Granite divides by ``logits_scaling``, HyperCLOVA X multiplies), hence per type.
_MULTIPLY_BY = {
    "cohere": "logit_scale", "cohere2": "logit_scale", "cohere2_moe": "logit_scale",
    "falcon_h1": "lm_head_multiplier", "hyperclovax": "logits_scaling",
    "muse_glimmer": "output_multiplier", "muse_spark": "output_multiplier",
}
_DIVIDE_BY = {
    "granite": "logits_scaling", "granite_swa": "logits_scaling", "granitemoe": "logits_scaling",
    "granitemoe_swa": "logits_scaling", "granitemoeshared": "logits_scaling",
    "granitemoehybrid": "logits_scaling", "minicpm3": "logits_scaling",
}


class UnsupportedHeadError(UserError):
    """The model's forward changes the head's logits in a way ``project`` does not reproduce."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The causal-LM object under a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Last hidden states ``[B, T, H]`` without computing the vocabulary projection."""
    decoder = _unwrap(model).get_decoder()
    return decoder(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state


def project(model: nn.Module, states: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits for selected hidden states ``[N, H] -> [N, V]``, float32, as the model's forward
    gives them (scaled, soft-capped)."""
    lm = _unwrap(model)
    logits = lm.get_output_embeddings()(states).float()
    config = lm.config.get_text_config()  # a multimodal model's language half holds the head settings
    if config.model_type in _MULTIPLY_BY:
        logits = logits * getattr(config, _MULTIPLY_BY[config.model_type])
    elif config.model_type in _DIVIDE_BY:
        logits = logits / getattr(config, _DIVIDE_BY[config.model_type])
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3/4, nanochat, ...: cap * tanh(x / cap)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return logits


@torch.no_grad()
def check_head(model: nn.Module, source: str = "model") -> None:
    """Raise ``UnsupportedHeadError`` unless ``project`` matches the model's own forward on a few tokens.

    A model whose forward post-processes the head's logits in a way not listed above would otherwise
    give silently wrong log-probs; one forward of 4 tokens at load time rules that out.
    """
    lm = _unwrap(model)
    device = next(lm.parameters()).device
    ids = torch.tensor([[1, 2, 3, 4]], device=device) % lm.config.get_text_config().vocab_size
    mask = torch.ones_like(ids)
    was_training = lm.training
    lm.eval()  # dropout off: both passes must see the same network
    try:
        theirs = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits[0].float()
        mine = project(model, hidden_states(model, ids, mask)[0])
    finally:
        lm.train(was_training)
    exact = next(lm.parameters()).dtype == torch.float32
    tolerance = 1e-4 if exact else 2e-2  # bf16/fp16 forwards apply the scale or cap in low precision
    if not torch.allclose(mine, theirs, rtol=tolerance, atol=tolerance):
        raise UnsupportedHeadError(
            f"{source}: its forward transforms the LM head's logits in a way emalign does not reproduce"
            f" (model_type {lm.config.model_type!r}, max difference {(mine - theirs).abs().max().item():.3g});"
            " log-probs would be wrong, so this architecture is not supported"
        )


def _chunk_logps(model: nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = project(model, states)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def token_logps(
    model: nn.Module, states: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK_POSITIONS
) -> torch.Tensor:
    """``log p(targets[n] | states[n])`` for ``[N, H]`` states, ``chunk`` positions per projection."""
    pieces = []
    for s, t in zip(states.split(chunk), targets.split(chunk)):
        if torch.is_grad_enabled():  # keep only the chunk's inputs; its logits are recomputed in backward
            pieces.append(checkpoint(_chunk_logps, model, s, t, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(model, s, t))
    return torch.cat(pieces) if pieces else states.new_zeros(0, dtype=torch.float32)


def target_logps(
    model: nn.Module,
    states: torch.Tensor,
    input_ids: torch.Tensor,
    target_mask: torch.Tensor,
    chunk: int = CHUNK_POSITIONS,
) -> torch.Tensor:
    """Per-sequence sum of ``log p(input_ids[b, t] | < t)`` over positions with ``target_mask[b, t]``.

    Position ``t`` is predicted from the hidden state at ``t - 1``; ``target_mask[:, 0]`` must be False.
    """
    rows, cols = target_mask.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return states.new_zeros(input_ids.shape[0], dtype=torch.float32)
    logps = token_logps(model, states[rows, cols - 1], input_ids[rows, cols], chunk)
    return torch.zeros(input_ids.shape[0], dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)


def sequence_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_mask: torch.Tensor,
    chunk: int = CHUNK_POSITIONS,
) -> torch.Tensor:
    """One decoder pass, then ``target_logps``."""
    return target_logps(model, hidden_states(model, input_ids, attention_mask), input_ids, target_mask, chunk)


def mean_token_nll(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    chunk: int = CHUNK_POSITIONS,
) -> torch.Tensor:
    """Supervised loss: mean next-token cross-entropy over labelled tokens, head applied to those only."""
    states = hidden_states(model, input_ids, attention_mask)
    target_mask = torch.zeros_like(labels, dtype=torch.bool)
    target_mask[:, 1:] = labels[:, 1:] != -100
    rows, cols = target_mask.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return states.sum() * 0.0
    return -token_logps(model, states[rows, cols - 1], labels[rows, cols], chunk).mean()


def pad_right(
    sequences: list[list[int]], pad_id: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
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


def response_logps(
    model: nn.Module, prompts: list[list[int]], responses: list[list[int]], pad_id: int, device=None
) -> torch.Tensor:
    """Summed log-probs of each response given its prompt, ``prompt + response`` as right-padded rows."""
    ids, mask = pad_right([p + r for p, r in zip(prompts, responses)], pad_id, device)
    target = response_mask([len(p) for p in prompts], [len(r) for r in responses], ids.shape[1], device)
    return sequence_logps(model, ids, mask, target)


def pair_logps(
    model: nn.Module,
    prompts: list[list[int]],
    chosen: list[list[int]],
    rejected: list[list[int]],
    pad_id: int,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each pair's chosen and rejected response after its prompt: ``([P], [P])``.

    Where the attention takes a 4D mask, each pair is one row ``prompt + chosen + rejected``
    (``SharedPrefixRows``), so the prompt runs through the decoder once instead of twice (prefix sharing:
    Wang & Hegde 2024, "Accelerating Direct Preference Optimization with Prefix Sharing"). Otherwise:
    ``prompt + chosen`` and ``prompt + rejected`` as separate right-padded rows.
    """
    if not takes_shared_prefix(model, max(map(sum, zip(map(len, prompts), map(len, chosen), map(len, rejected))))):
        return response_logps(model, prompts * 2, chosen + rejected, pad_id, device).chunk(2)
    rows = SharedPrefixRows(prompts, [[c, r] for c, r in zip(chosen, rejected)], pad_id, device)
    picks = [(i, j, rows.lengths[i][j]) for j in (0, 1) for i in range(len(prompts))]
    return rows.logps(model, rows.hidden_states(model), picks).chunk(2)


class SharedPrefixRows:
    """One row per prefix: ``prefix + continuation_1 + ... + continuation_k``, each continuation seeing its
    prefix and itself only, at the positions it would have right after the prefix.

    A 4D attention mask hides the other continuations and position ids restart each one where the prefix
    ends, so every continuation is computed exactly as in a row of its own (to float rounding: tested in
    ``tests/test_logprobs.py``) while the prefix is computed once. The demo's prompts are longer than its
    answers, so pairs (two answers) and reviews (two samples per prompt) skip about a third of the tokens.
    """

    def __init__(self, prefixes: list[list[int]], continuations: list[list[list[int]]], pad_id: int, device=None):
        self.prefix_lengths = [len(p) for p in prefixes]
        self.lengths = [[len(c) for c in group] for group in continuations]
        self.starts: list[list[int]] = []
        rows = []
        for prefix, group in zip(prefixes, continuations):
            starts, row = [], list(prefix)
            for continuation in group:
                starts.append(len(row))
                row += continuation
            self.starts.append(starts)
            rows.append(row)
        self.ids, _ = pad_right(rows, pad_id, device)
        width = self.ids.shape[1]
        allowed = torch.ones(width, width, dtype=torch.bool).tril().repeat(len(rows), 1, 1)
        positions = torch.arange(width).repeat(len(rows), 1)
        for i, (p, starts, lengths) in enumerate(zip(self.prefix_lengths, self.starts, self.lengths)):
            for start, length in zip(starts, lengths):
                allowed[i, start : start + length, p:start] = False  # earlier continuations stay hidden
                positions[i, start : start + length] = torch.arange(p, p + length)
        self.allowed, self.positions = allowed[:, None].to(device), positions.to(device)

    def hidden_states(self, model: nn.Module) -> torch.Tensor:
        mask = self.allowed
        if _attention(model) == "eager":  # eager attention adds the mask to the scores; sdpa takes booleans
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
        return hidden_states(model, self.ids, mask, self.positions)

    def last(self, i: int, j: int) -> int:
        """Index in row ``i`` of the last token of continuation ``j``."""
        return self.starts[i][j] + self.lengths[i][j] - 1

    def logps(self, model: nn.Module, states: torch.Tensor, picks: list[tuple[int, int, int]]) -> torch.Tensor:
        """Summed log-probs ``[len(picks)]``; a pick ``(i, j, count)`` takes the first ``count`` tokens of
        continuation ``j`` of prefix ``i``, whose first token is predicted from the prefix's last state."""
        rows, source, target, segment = [], [], [], []
        for n, (i, j, count) in enumerate(picks):
            start = self.starts[i][j]
            rows += [i] * count
            source += ([self.prefix_lengths[i] - 1] + list(range(start, start + count - 1)))[:count]
            target += list(range(start, start + count))
            segment += [n] * count
        as_index = lambda values: torch.tensor(values, dtype=torch.long, device=states.device)  # noqa: E731
        row = as_index(rows)
        logps = token_logps(model, states[row, as_index(source)], self.ids[row, as_index(target)])
        return torch.zeros(len(picks), dtype=logps.dtype, device=logps.device).index_add(0, as_index(segment), logps)


def _attention(model: nn.Module) -> str:
    return attention_kernel(_unwrap(model).config.get_text_config()) or "eager"


def takes_shared_prefix(model: nn.Module, length: int) -> bool:
    """Whether a custom 4D mask is honoured as given: sdpa or eager attention, and no sliding window that a
    row of ``length`` tokens would reach (transformers then passes the mask through unchanged)."""
    window = getattr(_unwrap(model).config.get_text_config(), "sliding_window", None)
    return _attention(model) in ("sdpa", "eager") and (not window or length <= window)
