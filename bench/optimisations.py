"""Before/after measurements of each performance choice in the conscience step.

    python bench/optimisations.py --json runs/bench/optimisations.json
    python bench/optimisations.py --tiny --repeats 1 --json /tmp/opt.json             # smoke mode

Each row times the shipped way ("after") against the obvious alternative ("before") on the same
model, prompts, seeds and rollouts (SmolLM2-135M-Instruct, LoRA r=16, 4 prompts x 2 samples x 64
new tokens, temperature 0.9), median of ``--repeats`` runs after one warm-up run of each:

* batched_rows        one generate over prompts x samples repeated rows  vs  one generate per prompt
* stop_at_eos         generation ends when every row has its end of turn  vs  always max_new_tokens
* kv_cache_generation generate with the KV cache (``Policy.generating``)  vs  without (what TRL does
                      under gradient checkpointing: ``use_cache=False``)
* gc_off_generation   a policy with gradient checkpointing on: ``sample_ids`` inside
                      ``Policy.generating()`` (eval mode, checkpointing off, cache on)  vs  straight
                      from the training-mode model
* sampler             the per-row seeded sampler in ``sample_ids``  vs  the per-row Gumbel noise
                      sampler it replaced (a full-vocabulary ``torch.rand`` per row per token)
* sampler_call_RxV    the sampler alone on random logits, R rows x V vocabulary (20 calls):
                      the per-row Gumbel sampler  vs  the current one (shows how each scales)
* sampler_vs_plain    ``sample_ids``  vs  plain HF ``do_sample`` (not seeded per row), forced length
* last_position_verdict  head at the verdict and response positions only  vs  full-sequence logits
* shared_review_pass  one frozen pass for verdict and reference log-probs  vs  two passes
* cached_ref_logps    preference update with the queued reference log-probs  vs  recomputing them
* concat_forward      chosen and rejected in one policy forward  vs  two forwards
* cpu_threads_decoding  ``sample_ids`` with ``GenerationSettings(cpu_threads=1)``  vs  the process's
                      torch threads (CPU only)
* lora_unmerged_generation (proposal, not shipped) generation through the LoRA layers  vs  the base
                      weights alone (the upper bound of what merging the adapter for generation saves)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    set_threads,
    PROMPTS,
    fmt,
    load_now,
    machine,
    median,
    note,
    print_table,
    sync,
    tiny_model_dir,
    write_json,
)  # noqa: E402


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


def bench_pair(before: Callable[[], Any], after: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """Median wall time of each (one untimed warm-up each first), interleaved so load drifts hit both alike."""
    before(), after()
    b, a = [], []
    for _ in range(repeats):
        for fn, out in ((before, b), (after, a)):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - start)
    return {
        "before_s": median(b),
        "after_s": median(a),
        "speedup": median(b) / median(a),
        "before_all_s": b,
        "after_all_s": a,
        "load_1m": load_now()["load_1m"],
    }


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


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--tiny", action="store_true", help="2-layer random Llama with the SmolLM2 tokenizer (smoke test)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of each side (default 3, --tiny 1)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (--tiny 8)")
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--only", nargs="*", help="run only these rows")
    parser.add_argument("--workdir")
    parser.add_argument(
        "--threads", type=int, help="torch/OpenMP threads in this process and its children (default: torch's)"
    )
    args = parser.parse_args(argv)
    set_threads(args.threads)
    args.repeats = args.repeats or (1 if args.tiny else 3)
    args.max_new_tokens = args.max_new_tokens or (8 if args.tiny else 64)

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    from emalign.conscience import Conscience, reference_logps
    from emalign.logprobs import pad_right, pair_logps, response_mask, sequence_logps
    from emalign.losses import SigmoidDPO
    from emalign.models import LoRA, Policy
    from emalign.sampling import GenerationSettings, render_prompt, sample_ids
    from emalign.types import Pair

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="emalign-bench-opt-"))
    source = tiny_model_dir(workdir) if args.tiny else "smollm2-135m-instruct"
    info = machine()
    torch.manual_seed(0)
    policy = Policy(source, adapter=LoRA(r=16, alpha=32)).to(device)
    tok = policy.tokenizer
    # A trained-looking adapter: LoRA B starts at zero, which would make policy == reference exactly.
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    prompt_ids = [render_prompt(tok, [{"role": "user", "content": p}]) for p in PROMPTS[: args.prompts]]
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=1.0,
        batch_size=args.prompts * args.samples,
    )
    K = args.samples
    rows: dict[str, Any] = {}
    wanted = lambda name: not args.only or name in args.only  # noqa: E731
    note(f"optimisations on {source} ({device}), load {info['load_1m']}")

    def record(name: str, before: str, after: str, result: dict[str, Any], **extra) -> None:
        rows[name] = {"before": before, "after": after, **result, **extra}
        note(
            f"{name}: before {result['before_s']:.3f} s, after {result['after_s']:.3f} s, x{result['speedup']:.2f} (load {result['load_1m']})"
        )

    with policy.generating() as model:
        if wanted("batched_rows"):
            per_prompt = GenerationSettings(**{**settings.__dict__, "batch_size": K})
            record(
                "batched_rows",
                "one generate per prompt (its samples as rows)",
                f"one generate of {args.prompts}x{K} repeated rows",
                bench_pair(
                    lambda: sample_ids(model, tok, prompt_ids, per_prompt, K, 1, 0),
                    lambda: sample_ids(model, tok, prompt_ids, settings, K, 1, 0),
                    args.repeats,
                ),
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
            record(
                "stop_at_eos",
                f"always {args.max_new_tokens} new tokens",
                "stop when every row has ended its turn",
                bench_pair(
                    lambda: generate_rows(model, tok, short, settings, K, 1, 0, stop_at_eos=False),
                    lambda: generate_rows(model, tok, short, settings, K, 1, 0),
                    args.repeats,
                ),
                longest_row_tokens=max(len(r.response_ids) for r in out),
                rows_finished=sum(r.finished for r in out),
                rows=len(out),
            )
        if wanted("cpu_threads_decoding") and device.type == "cpu":
            one = GenerationSettings(**{**settings.__dict__, "cpu_threads": 1})
            record(
                "cpu_threads_decoding",
                f"{torch.get_num_threads()} torch threads (the process's)",
                "1 thread while decoding",
                bench_pair(
                    lambda: sample_ids(model, tok, prompt_ids, settings, K, 1, 0),
                    lambda: sample_ids(model, tok, prompt_ids, one, K, 1, 0),
                    args.repeats,
                ),
            )
        if wanted("kv_cache_generation"):
            record(
                "kv_cache_generation",
                "use_cache=False (TRL under gradient checkpointing)",
                "KV cache (Policy.generating, sample_ids)",
                bench_pair(
                    lambda: generate_rows(model, tok, prompt_ids, settings, K, 1, 0, use_cache=False),
                    lambda: generate_rows(model, tok, prompt_ids, settings, K, 1, 0),
                    args.repeats,
                ),
            )
        if wanted("sampler"):
            record(
                "sampler",
                "per-row Gumbel noise over the whole vocabulary",
                "sample_ids' current sampler",
                bench_pair(
                    lambda: generate_rows(
                        model, tok, prompt_ids, settings, K, 1, 0, stop_at_eos=False, sampler=LegacyGumbelSampler
                    ),
                    lambda: generate_rows(model, tok, prompt_ids, settings, K, 1, 0, stop_at_eos=False),
                    args.repeats,
                ),
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

                record(
                    name,
                    "per-row Gumbel noise over the whole vocabulary",
                    "sample_ids' current sampler",
                    bench_pair(lambda: calls(LegacyGumbelSampler), lambda: calls(SeededSampler), args.repeats),
                    note="20 calls",
                )
        if wanted("sampler_vs_plain"):
            from emalign.sampling import _left_pad

            ids, mask = _left_pad([p for p in prompt_ids for _ in range(K)], tok.pad_token_id, device)
            plain = lambda: model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=args.temperature,
                top_p=1.0,
                top_k=0,  # noqa: E731
                max_new_tokens=args.max_new_tokens,
                eos_token_id=[-1],
                pad_token_id=tok.pad_token_id,
            )
            record(
                "sampler_vs_plain",
                "plain HF do_sample (one global RNG)",
                "sample_ids' sampler (per-row seeds)",
                bench_pair(
                    plain,
                    lambda: generate_rows(model, tok, prompt_ids, settings, K, 1, 0, stop_at_eos=False),
                    args.repeats,
                ),
                note="both forced to max_new_tokens; before/after is plain/ours",
            )
        if wanted("lora_unmerged_generation"):

            def base_only():
                with policy.model.disable_adapter():
                    generate_rows(model, tok, prompt_ids, settings, K, 1, 0, stop_at_eos=False)

            record(
                "lora_unmerged_generation",
                "through the unmerged LoRA layers (shipped)",
                "base weights only (what a merged adapter would cost)",
                bench_pair(
                    lambda: generate_rows(model, tok, prompt_ids, settings, K, 1, 0, stop_at_eos=False),
                    base_only,
                    args.repeats,
                ),
                note="proposal: not shipped",
            )
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
            record(
                "gc_off_generation",
                "training-mode model, gradient checkpointing on",
                "inside Policy.generating()",
                bench_pair(
                    lambda: sample_ids(policy.model, tok, prompt_ids, settings, K, 1, 0), in_generating, args.repeats
                ),
            )
        finally:
            base.gradient_checkpointing_disable()
            policy.gradient_checkpointing, policy.model.config.use_cache = False, True

    conscience = Conscience()
    prompts, responses = [r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts]
    with policy.as_reference() as reference:
        if wanted("last_position_verdict"):
            record(
                "last_position_verdict",
                "full-sequence logits, then pick",
                "head at the verdict and response positions only",
                bench_pair(
                    lambda: review_full_logits(conscience, reference, tok, prompts, responses),
                    lambda: conscience.review(reference, tok, prompts, responses),
                    args.repeats,
                ),
            )
        if wanted("shared_review_pass"):
            record(
                "shared_review_pass",
                "verdict pass + separate reference log-prob pass",
                "one pass for both",
                bench_pair(
                    lambda: review_two_passes(conscience, reference, tok, prompts, responses),
                    lambda: conscience.review(reference, tok, prompts, responses),
                    args.repeats,
                ),
            )
        review = conscience.review(reference, tok, prompts, responses)

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
        record(
            "cached_ref_logps",
            "update + reference forward over chosen and rejected",
            "update with the queued reference log-probs",
            bench_pair(lambda: update_concat(True), update_concat, args.repeats),
        )
    if wanted("concat_forward"):
        record(
            "concat_forward",
            "chosen and rejected in two policy forwards",
            "one concatenated forward",
            bench_pair(update_split, update_concat, args.repeats),
        )
    if wanted("shared_prompt_pairs"):
        record(
            "shared_prompt_pairs",
            "prompt + chosen and prompt + rejected as padded rows",
            "one row per pair, prompt shared (4D mask)",
            bench_pair(update_concat, update_shared, args.repeats),
            tokens_before=2
            * len(pairs)
            * max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs),
            tokens_after=len(pairs) * max(len(p.prompt_ids + p.chosen_ids + p.rejected_ids) for p in pairs),
        )

    result = {
        "benchmark": "optimisations",
        "machine": info,
        "settings": {
            "model": source,
            "prompts": args.prompts,
            "samples": K,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "repeats": args.repeats,
            "device": str(device),
        },
        "rows": rows,
        "load_end": load_now(),
    }
    for name, row in rows.items():
        result[f"speedup_{name}"] = row["speedup"]
    print_table(
        f"optimisations ({device}, load {info['load_1m']} -> {result['load_end']['load_1m']})",
        [
            (n, r["before"], fmt(r["before_s"]), r["after"], fmt(r["after_s"]), fmt(r["speedup"]))
            for n, r in rows.items()
        ],
        ("row", "before", "s", "after", "s", "speedup"),
    )
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
