"""Shared prefill (``GenerationSettings.share_prefill``): each prompt runs once, and on a tiny model (where no
rounding difference lands on a sampling boundary) its samples decode exactly the same tokens.

    pytest tests/test_sampling.py -q
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Iterator

import pytest

from emalign.models.sampling import GenerationSettings, render_prompt, sample_ids

# Different lengths, so the rows are left-padded by different amounts.
CONTENTS = ("Name a colour.", "Say hi to the people in the next room, then tell me about your day in detail.")


@contextmanager
def embedded_tokens(model) -> Iterator[list[int]]:
    """The number of tokens each forward embeds (prefill and decode steps alike), while inside."""
    seen: list[int] = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    try:
        yield seen
    finally:
        handle.remove()


@pytest.mark.parametrize("merge_lora", [False, True])
def test_shared_prefill_gives_the_same_tokens_and_runs_each_prompt_once(trained_policy, merge_lora):
    tok = trained_policy.tokenizer
    prompts = [render_prompt(tok, [{"role": "user", "content": c}]) for c in CONTENTS]
    assert len(prompts[0]) != len(prompts[1])
    settings = GenerationSettings(max_new_tokens=10, temperature=1.0, merge_lora=merge_lora)
    k = 3
    with trained_policy.generating() as model, embedded_tokens(model) as seen:
        apart = sample_ids(model, tok, prompts, dataclasses.replace(settings, share_prefill=False), k, seed=4)
        apart_tokens = seen[0]  # generate's own prefill: every prompt k times, padded to the longest
        seen.clear()
        shared = sample_ids(model, tok, prompts, settings, k, seed=4)
    assert [r.response_ids for r in shared] == [r.response_ids for r in apart]
    assert len({tuple(r.response_ids) for r in apart}) > 1  # sampled, not a constant
    width = max(map(len, prompts))
    assert apart_tokens == len(prompts) * k * width
    assert seen[:2] == [len(prompts) * (width - 1), len(prompts) * k]  # each prompt once, then its last token per row


def test_one_sample_per_prompt_and_one_token_prompts_are_generated_as_before(trained_policy):
    tok = trained_policy.tokenizer
    settings = GenerationSettings(max_new_tokens=4, temperature=1.0)
    with trained_policy.generating() as model, embedded_tokens(model) as seen:
        sample_ids(model, tok, [[5, 6, 7]], settings, num_samples=1)
        assert seen[0] == 3  # no separate prefill
        seen.clear()
        rollouts = sample_ids(model, tok, [[5]], settings, num_samples=2)  # nothing to share before the last token
        assert seen[0] == 2
    assert len(rollouts) == 2


@pytest.mark.slow  # 20,000 draws: about 30 s
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_seeded_sampler_draws_from_the_warped_distribution(top_p):
    """The cheaper sampler the benchmarks led to (one uniform per row and token) is still an exact, seeded draw."""
    import torch

    from emalign.models.sampling import SeededSampler

    # 307 tokens (not a multiple of the search block), masked tokens between the live ones.
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf"), 0.5] + [float("-inf")] * 300 + [1.5]])
    sampler = SeededSampler([11, 12], temperature=0.9, top_p=top_p, device=torch.device("cpu"))
    n = 20000
    counts = torch.zeros(logits.shape[1])
    for _ in range(n // 2):
        out = sampler(None, logits.expand(2, -1).clone())
        assert int(torch.isfinite(out).sum()) == 2  # one finite score per row: greedy takes the draw
        counts.index_add_(0, out.argmax(-1), torch.ones(2))
    warped = logits / 0.9
    if top_p < 1.0:
        ordered, order = warped.sort(descending=True)
        drop = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1) > top_p
        warped = warped.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    expected = warped.softmax(-1)[0]
    live = expected > 0
    assert counts[~live].sum() == 0
    z = (counts[live] / n - expected[live]) / (expected[live] * (1 - expected[live]) / n).sqrt()
    assert z.abs().max() < 5

    again = SeededSampler([11, 12], temperature=0.9, top_p=top_p, device=torch.device("cpu"))
    first = SeededSampler([11, 12], temperature=0.9, top_p=top_p, device=torch.device("cpu"))
    assert all(torch.equal(first(None, logits.expand(2, -1).clone()), again(None, logits.expand(2, -1).clone()))
               for _ in range(20))
