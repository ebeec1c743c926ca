"""The review and preference-update rows of ``bench/optimisations.py``: how the frozen reference reads the
rollouts (verdict and reference log-probs), then how the policy's preference update forwards the pairs."""

from __future__ import annotations

from typing import Any, Callable


def review_two_passes(conscience, reference, tokenizer, prompts, responses):
    """Verdict from one pass, reference log-probs from a second (``reference_logps``)."""
    import torch

    from emalign.conscience import reference_logps
    from emalign.logprobs import hidden_states, pad_right, project

    yes, no, suffix = conscience.answer_tokens(tokenizer)
    device = next(reference.parameters()).device
    with torch.no_grad():
        sequences = [p + conscience.reviewed_response(tokenizer, r) + suffix for p, r in zip(prompts, responses)]
        ids, mask = pad_right(sequences, tokenizer.pad_token_id, device)
        states = hidden_states(reference, ids, mask)
        verdict = project(reference, states[torch.arange(len(sequences), device=device), mask.sum(1) - 1]).log_softmax(
            -1
        )
        scores = verdict[:, yes].logsumexp(-1) - verdict[:, no].logsumexp(-1)
        return scores, reference_logps(reference, tokenizer, prompts, responses)


def review_full_logits(conscience, reference, tokenizer, prompts, responses):
    """One pass like ``Conscience.review`` but through the full LM head at every position."""
    import torch

    from emalign.logprobs import pad_right, response_mask

    yes, no, suffix = conscience.answer_tokens(tokenizer)
    device = next(reference.parameters()).device
    with torch.no_grad():
        read = [conscience.reviewed_response(tokenizer, r) for r in responses]
        ids, mask = pad_right([p + r + suffix for p, r in zip(prompts, read)], tokenizer.pad_token_id, device)
        logp = reference(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1)
        verdict = logp[torch.arange(len(prompts), device=device), mask.sum(1) - 1]
        scores = verdict[:, yes].logsumexp(-1) - verdict[:, no].logsumexp(-1)
        target = response_mask([len(p) for p in prompts], [len(r) for r in responses], ids.shape[1], device)
        token = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        return scores, (token * target[:, 1:]).sum(1)


def review_rows(policy, rollouts, wanted: Callable[[str], bool], measure: Callable[..., None]) -> Any:
    """Measure the wanted review rows on the rollouts; returns the shipped review of them."""
    from emalign.conscience import Conscience

    tok = policy.tokenizer
    conscience = Conscience()
    prompts, responses = [r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts]
    with policy.as_reference() as reference:
        if wanted("last_position_verdict"):
            measure(
                "last_position_verdict",
                "full-sequence logits, then pick",
                "head at the verdict and response positions only",
                lambda: review_full_logits(conscience, reference, tok, prompts, responses),
                lambda: conscience.review(reference, tok, prompts, responses),
            )
        if wanted("shared_review_pass"):
            measure(
                "shared_review_pass",
                "verdict pass + separate reference log-prob pass",
                "one pass for both",
                lambda: review_two_passes(conscience, reference, tok, prompts, responses),
                lambda: conscience.review(reference, tok, prompts, responses),
            )
        return conscience.review(reference, tok, prompts, responses)


def update_rows(policy, rollouts, review, device, wanted: Callable[[str], bool], measure: Callable[..., None]) -> None:
    """Measure the wanted preference-update rows on pairs of consecutive rollouts (the policy left in train mode)."""
    import torch

    from emalign.conscience import reference_logps
    from emalign.logprobs import pad_right, pair_logps, response_mask, sequence_logps
    from emalign.losses import SigmoidDPO
    from emalign.types import Pair

    tok = policy.tokenizer
    pairs = [
        Pair(
            rollouts[2 * i].prompt_ids,
            rollouts[2 * i].response_ids,
            rollouts[2 * i + 1].response_ids,
            float(review.ref_logps[2 * i]),
            float(review.ref_logps[2 * i + 1]),
            0.0,
            0.0,
            0,
        )
        for i in range(len(rollouts) // 2)
    ]
    loss_fn = SigmoidDPO(beta=0.1)
    policy.model.train()

    def logps(model, chosen: bool, pairs=pairs):
        ids, mask = pad_right(
            [p.prompt_ids + (p.chosen_ids if chosen else p.rejected_ids) for p in pairs], tok.pad_token_id, device
        )
        target = response_mask(
            [len(p.prompt_ids) for p in pairs],
            [len(p.chosen_ids if chosen else p.rejected_ids) for p in pairs],
            ids.shape[1],
            device,
        )
        return sequence_logps(model, ids, mask, target)

    def update_concat(recompute_ref: bool = False):
        prompts2 = [p.prompt_ids for p in pairs] * 2
        responses2 = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
        if recompute_ref:
            with policy.as_reference() as reference:
                ref = reference_logps(reference, tok, prompts2, responses2).to(device)
            ref_c, ref_r = ref.chunk(2)
        else:
            ref_c = torch.tensor([p.ref_chosen for p in pairs], device=device)
            ref_r = torch.tensor([p.ref_rejected for p in pairs], device=device)
        ids, mask = pad_right([a + b for a, b in zip(prompts2, responses2)], tok.pad_token_id, device)
        target = response_mask([len(p) for p in prompts2], [len(r) for r in responses2], ids.shape[1], device)
        pi_c, pi_r = sequence_logps(policy.model, ids, mask, target).chunk(2)
        loss_fn(pi_c, pi_r, ref_c, ref_r)[0].mean().backward()
        policy.model.zero_grad(set_to_none=True)

    def update_shared():
        ref_c = torch.tensor([p.ref_chosen for p in pairs], device=device)
        ref_r = torch.tensor([p.ref_rejected for p in pairs], device=device)
        pi_c, pi_r = pair_logps(
            policy.model,
            [p.prompt_ids for p in pairs],
            [p.chosen_ids for p in pairs],
            [p.rejected_ids for p in pairs],
            tok.pad_token_id,
            device,
        )
        loss_fn(pi_c, pi_r, ref_c, ref_r)[0].mean().backward()
        policy.model.zero_grad(set_to_none=True)

    def update_split():
        ref_c = torch.tensor([p.ref_chosen for p in pairs], device=device)
        ref_r = torch.tensor([p.ref_rejected for p in pairs], device=device)
        loss_fn(logps(policy.model, True), logps(policy.model, False), ref_c, ref_r)[0].mean().backward()
        policy.model.zero_grad(set_to_none=True)

    if wanted("cached_ref_logps"):
        measure(
            "cached_ref_logps",
            "update + reference forward over chosen and rejected",
            "update with the queued reference log-probs",
            lambda: update_concat(True),
            update_concat,
        )
    if wanted("concat_forward"):
        measure(
            "concat_forward",
            "chosen and rejected in two policy forwards",
            "one concatenated forward",
            update_split,
            update_concat,
        )
    if wanted("shared_prompt_pairs"):
        measure(
            "shared_prompt_pairs",
            "prompt + chosen and prompt + rejected as padded rows",
            "one row per pair, prompt shared (4D mask)",
            update_concat,
            update_shared,
            tokens_before=2
            * len(pairs)
            * max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs),
            tokens_after=len(pairs) * max(len(p.prompt_ids + p.chosen_ids + p.rejected_ids) for p in pairs),
        )
