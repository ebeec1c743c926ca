"""The generation rows of ``bench/optimisations.py``: batching, stopping, the KV cache, gradient checkpointing,
the sampler, CPU threads and the LoRA layers, each timed against its alternative on the same prompts and seeds."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable


class LegacyGumbelSampler:
    """The sampler ``sample_ids`` used before: Gumbel-max with full-vocabulary uniform noise per row per token."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device) -> None:
        import torch

        self.generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p
        self.device = device

    def __call__(self, input_ids, scores):
        import torch

        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            cumulative = sorted_scores.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_scores.softmax(-1) > self.top_p
            scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators]).to(self.device)
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
        return scores + gumbel


def generate_rows(
    model, tokenizer, prompt_ids, settings, num_samples, seed, step, use_cache=True, stop_at_eos=True, sampler=None
):
    """``emalign.sampling``'s generate call for one chunk, with the switches the ablations need."""
    from transformers import LogitsProcessorList

    import emalign.sampling as sampling

    device = next(model.parameters()).device
    eos = sampling.eos_token_ids(model, tokenizer)
    ids, mask = sampling._left_pad([p for p in prompt_ids for _ in range(num_samples)], tokenizer.pad_token_id, device)
    seeds = [sampling.sample_seed(seed, step, i, k) for i in range(len(prompt_ids)) for k in range(num_samples)]
    sampler = (sampler or sampling.SeededSampler)(seeds, settings.temperature, settings.top_p, device)
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=eos if stop_at_eos else [-1],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        use_cache=use_cache,
        temperature=None,
        top_p=None,
        top_k=None,
        logits_processor=LogitsProcessorList([sampler]),
    )


def generation_rows(
    policy, prompt_ids, settings, args, device, wanted: Callable[[str], bool], measure: Callable[..., None]
) -> list[Any]:
    """Measure the wanted generation rows; returns the rollouts the review and update rows score."""
    import torch

    from emalign.sampling import GenerationSettings, render_prompt, sample_ids

    tok = policy.tokenizer
    K = args.samples
    with policy.generating() as model:
        if wanted("batched_rows"):
            per_prompt = GenerationSettings(**{**settings.__dict__, "batch_size": K})
            measure(
                "batched_rows",
                "one generate per prompt (its samples as rows)",
                f"one generate of {args.prompts}x{K} repeated rows",
                lambda: sample_ids(model, tok, prompt_ids, per_prompt, K, 1, 0),
                lambda: sample_ids(model, tok, prompt_ids, settings, K, 1, 0),
            )
        if wanted("stop_at_eos"):
            # Prompts whose answers are short, so that every row can finish before max_new_tokens.
            short = [
                render_prompt(tok, [{"role": "user", "content": q}])
                for q in ["Say hi.", "Name a colour.", "Reply with one word: yes or no.", "What is 2+2?"][
                    : args.prompts
                ]
            ]
            out = sample_ids(model, tok, short, settings, K, 1, 0)
            measure(
                "stop_at_eos",
                f"always {args.max_new_tokens} new tokens",
                "stop when every row has ended its turn",
                lambda: generate_rows(model, tok, short, settings, K, 1, 0, stop_at_eos=False),
                lambda: generate_rows(model, tok, short, settings, K, 1, 0),
                longest_row_tokens=max(len(r.response_ids) for r in out),
                rows_finished=sum(r.finished for r in out),
                rows=len(out),
            )
        if wanted("cpu_threads_decoding") and device.type == "cpu":
            one = GenerationSettings(**{**settings.__dict__, "cpu_threads": 1})
            measure(
                "cpu_threads_decoding",
                f"{torch.get_num_threads()} torch threads (the process's)",
                "1 thread while decoding",
                lambda: sample_ids(model, tok, prompt_ids, settings, K, 1, 0),
                lambda: sample_ids(model, tok, prompt_ids, one, K, 1, 0),
            )
        if wanted("kv_cache_generation"):
            measure(
                "kv_cache_generation",
                "use_cache=False (TRL under gradient checkpointing)",
                "KV cache (Policy.generating, sample_ids)",
                lambda: generate_rows(model, tok, prompt_ids, settings, K, 1, 0, use_cache=False),
                lambda: generate_rows(model, tok, prompt_ids, settings, K, 1, 0),
            )
        if wanted("sampler"):
            measure(
                "sampler",
                "per-row Gumbel noise over the whole vocabulary",
                "sample_ids' current sampler",
                lambda: generate_rows(
                    model, tok, prompt_ids, settings, K, 1, 0, stop_at_eos=False, sampler=LegacyGumbelSampler
                ),
                lambda: generate_rows(model, tok, prompt_ids, settings, K, 1, 0, stop_at_eos=False),
                note="both forced to max_new_tokens",
            )
        for shape in ((args.prompts * K, len(tok)),) + (() if args.tiny else ((64, 151936),)):
            name = f"sampler_call_{shape[0]}x{shape[1]}"
            if wanted(name) or (args.only and "sampler_call" in args.only):
                from emalign.sampling import SeededSampler

                logits = torch.randn(*shape, device=device) * 3
                seeds = list(range(shape[0]))

                def calls(cls, n=20, logits=logits, seeds=seeds):
                    sampler = cls(seeds, args.temperature, 1.0, device)
                    for _ in range(n):
                        sampler(None, logits)

                measure(
                    name,
                    "per-row Gumbel noise over the whole vocabulary",
                    "sample_ids' current sampler",
                    lambda: calls(LegacyGumbelSampler),
                    lambda: calls(SeededSampler),
                    note="20 calls",
                )
        if wanted("sampler_vs_plain"):
            from emalign.sampling import _left_pad

            ids, mask = _left_pad([p for p in prompt_ids for _ in range(K)], tok.pad_token_id, device)

            def plain():
                return model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=True,
                    temperature=args.temperature,
                    top_p=1.0,
                    top_k=0,
                    max_new_tokens=args.max_new_tokens,
                    eos_token_id=[-1],
                    pad_token_id=tok.pad_token_id,
                )

            measure(
                "sampler_vs_plain",
                "plain HF do_sample (one global RNG)",
                "sample_ids' sampler (per-row seeds)",
                plain,
                lambda: generate_rows(model, tok, prompt_ids, settings, K, 1, 0, stop_at_eos=False),
                note="both forced to max_new_tokens; before/after is plain/ours",
            )
        if wanted("lora_unmerged_generation"):

            def base_only():
                with policy.model.disable_adapter():
                    generate_rows(model, tok, prompt_ids, settings, K, 1, 0, stop_at_eos=False)

            measure(
                "lora_unmerged_generation",
                "through the unmerged LoRA layers (shipped)",
                "base weights only (what a merged adapter would cost)",
                lambda: generate_rows(model, tok, prompt_ids, settings, K, 1, 0, stop_at_eos=False),
                base_only,
                note="proposal: not shipped",
            )
        if wanted("shared_prefill") or wanted("shared_prefill_long_prompts"):
            _shared_prefill_rows(model, tok, prompt_ids, settings, K, wanted, measure)
        rollouts = sample_ids(model, tok, prompt_ids, settings, K, 1, 0)

    if wanted("gc_off_generation"):
        base = policy.model.get_base_model()
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.gradient_checkpointing, policy.model.config.use_cache = True, False
        policy.model.train()

        def in_generating():
            with policy.generating() as model:
                sample_ids(model, tok, prompt_ids, settings, K, 1, 0)

        try:
            measure(
                "gc_off_generation",
                "training-mode model, gradient checkpointing on",
                "inside Policy.generating()",
                lambda: sample_ids(policy.model, tok, prompt_ids, settings, K, 1, 0),
                in_generating,
            )
        finally:
            base.gradient_checkpointing_disable()
            policy.gradient_checkpointing, policy.model.config.use_cache = False, True
    return rollouts


def _shared_prefill_rows(model, tok, prompt_ids, settings, K, wanted, measure) -> None:
    """``share_prefill`` off and on, on the bench's prompts and on the same prompts after a long code context
    (the first 1,600 characters of this file), where the prefill is a larger part of generation."""
    from emalign.sampling import render_prompt, sample_ids

    apart = dataclasses.replace(settings, share_prefill=False)
    context = Path(__file__).read_text()[:1600]
    long = [render_prompt(tok, [{"role": "user", "content": context + "\n\n" + tok.decode(p)}]) for p in prompt_ids]
    for name, prompts in (("shared_prefill", prompt_ids), ("shared_prefill_long_prompts", long)):
        if not wanted(name):
            continue
        pairs = zip(sample_ids(model, tok, prompts, apart, K, 1, 0), sample_ids(model, tok, prompts, settings, K, 1, 0))
        # A different batch shape rounds differently (logits within about 5e-5 on SmolLM2), which can flip a
        # token sampled right at a boundary; the row differs from there on.
        differ_at = [next((i for i, (u, v) in enumerate(zip(a.response_ids, b.response_ids)) if u != v), None)
                     for a, b in pairs]
        measure(
            name,
            f"each of the {K} samples prefills its prompt",
            "each prompt prefilled once, its KV cache copied to its samples",
            lambda prompts=prompts: sample_ids(model, tok, prompts, apart, K, 1, 0),
            lambda prompts=prompts: sample_ids(model, tok, prompts, settings, K, 1, 0),
            prompt_tokens=[len(p) for p in prompts],
            identical_rows=sum(d is None for d in differ_at),
            rows=len(differ_at),
            first_difference_at=differ_at,
        )
