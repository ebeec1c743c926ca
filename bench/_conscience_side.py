"""Our side of ``bench/conscience_vs_trl.py``: the conscience step through the real ``ConscienceCallback.run``,
timed piece by piece in this process; ``sample_ids`` against plain HF sampling; and the peak memory of a short fit
with the conscience against the same fit without it (child processes)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from bench._common import PROMPTS, load_now, median, note, sync


class _Clock:
    """Wraps a callable and accumulates its wall time (and what it returned) per conscience step."""

    def __init__(self, fn):
        self.fn = fn
        self.seconds = 0.0
        self.last = None

    def __call__(self, *args, **kwargs):
        sync()
        start = time.perf_counter()
        self.last = self.fn(*args, **kwargs)
        sync()
        self.seconds += time.perf_counter() - start
        return self.last

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def build(source: str, args, device):
    """The policy, module, conscience callback and generation settings of our side, as the demo sets them up."""
    import torch

    from emalign.callbacks.conscience import ConscienceCallback
    from emalign.conscience.verdict import PairBuilder
    from emalign.training.losses import SigmoidDPO
    from emalign.models.policy import LoRA, Policy
    from emalign.training.module import EmergentAlignment
    from emalign.conscience.prompts import PromptSource
    from emalign.models.sampling import GenerationSettings

    torch.manual_seed(0)
    policy = Policy(source, adapter=LoRA(r=args.lora_r, alpha=2 * args.lora_r)).to(device)
    module = EmergentAlignment(
        policy, preference_loss=SigmoidDPO(beta=0.1), pairs_per_step=args.prompts, scheduler=None
    ).to(device)
    module.log = lambda *a, **k: None  # no trainer here
    prompts = PromptSource()
    prompts.prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.prompts * args.samples,
        merge_lora=True,  # as configs/demo.yaml: same tokens, merged LoRA layers (bench/README.md, "sampling weights")
    )
    callback = ConscienceCallback(
        every_n_steps=1,
        num_prompts=args.prompts,
        samples_per_prompt=args.samples,
        prompts=prompts,
        pair_builder=PairBuilder(margin=0.0),
        generation=settings,
        rollouts_file=None,
    )
    return policy, module, callback, settings


def measure_conscience(policy, module, callback, args) -> dict[str, Any]:
    """Warm-up + measured conscience steps through the real ``ConscienceCallback.run``."""
    import torch

    import emalign.conscience.step as cc

    gen = _Clock(cc.sample_ids)
    cc.sample_ids = gen  # the conscience step calls sample_ids through its module namespace
    review = _Clock(callback.conscience.review)
    callback.conscience.review = review
    build_pairs = _Clock(callback.pair_builder.build)
    callback.pair_builder.build = build_pairs
    put = _Clock(module.pair_queue.put)
    module.pair_queue.put = put
    draw = _Clock(module.pair_queue.sample)
    module.pair_queue.sample = draw
    params = [p for p in module.policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5)
    module.train()
    steps = []
    try:
        for step in range(args.warmup + args.steps):
            sync()
            start = time.perf_counter()
            stats = callback.run(module, step)
            sync()
            run_s = time.perf_counter() - start
            pairs = draw(module.pairs_per_step, step)
            pref_start = time.perf_counter()
            if pairs:
                loss = module.alignment_loss(pairs)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sync()
            pref_s = time.perf_counter() - pref_start
            rollouts = gen.last
            put_s, draw_s = put.take(), draw.take()
            record = {
                "step": step,
                "step_s": run_s + draw_s + pref_s,
                "gen_s": gen.take(),
                "gen_tokens": sum(len(r.response_ids) for r in rollouts),
                "gen_rows": len(rollouts),
                "finished_rows": sum(r.finished for r in rollouts),
                "review_s": review.take(),
                "reviewed": len(rollouts),
                "pair_build_s": build_pairs.take(),
                "queue_s": put_s + draw_s,
                "pref_s": pref_s,
                "pairs_built": int(stats["pairs_enqueued"]),
                "pairs_trained": len(pairs),
                "load_1m": load_now()["load_1m"],
            }
            record["other_s"] = run_s - record["gen_s"] - record["review_s"] - record["pair_build_s"] - put_s
            steps.append(record)
            note(
                f"conscience step {step}{' (warm-up)' if step < args.warmup else ''}: {record['step_s']:.2f} s "
                f"(gen {record['gen_s']:.2f}, review {record['review_s']:.2f}, pref {record['pref_s']:.2f}), "
                f"load {record['load_1m']}"
            )
    finally:
        cc.sample_ids = gen.fn
    measured = steps[args.warmup :]
    med = lambda key: median(r[key] for r in measured)  # noqa: E731
    return {
        "steps": steps,
        "step_s": med("step_s"),
        "per_pair_s": med("step_s") / args.prompts,
        "per_built_pair_s": median(r["step_s"] / max(1, r["pairs_built"]) for r in measured),
        "gen_s": med("gen_s"),
        "gen_tokens_per_s": median(r["gen_tokens"] / r["gen_s"] for r in measured),
        "gen_mean_tokens_per_row": median(r["gen_tokens"] / r["gen_rows"] for r in measured),
        "review_s": med("review_s"),
        "scoring_seqs_per_s": median(r["reviewed"] / r["review_s"] for r in measured),
        "pair_build_s": med("pair_build_s"),
        "pref_step_s": med("pref_s"),
        "queue_overhead_s": med("queue_s"),
        "other_s": med("other_s"),
        "pairs_built": med("pairs_built"),
    }


def measure_gen_efficiency(policy, settings, args, device) -> dict[str, Any]:
    """sample_ids vs plain HF sampling: same model, rows and prompts, both forced to max_new_tokens."""
    from emalign.models.sampling import render_prompt, sample_ids

    tokenizer = policy.tokenizer
    prompt_ids = [render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS[: args.prompts]]
    rows = [p for p in prompt_ids for _ in range(args.samples)]
    width = max(len(p) for p in rows)
    import torch

    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(rows):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    ours, raw = [], []
    with policy.generating() as model:
        config = model.generation_config
        saved = config.min_new_tokens
        config.min_new_tokens = args.max_new_tokens  # both sides generate exactly max_new_tokens per row
        try:
            for repeat in range(args.gen_repeats + 1):
                sync()
                start = time.perf_counter()
                with torch.no_grad():
                    out = model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        do_sample=True,
                        temperature=args.temperature,
                        top_p=args.top_p,
                        top_k=0,
                        max_new_tokens=args.max_new_tokens,
                        min_new_tokens=args.max_new_tokens,
                        pad_token_id=tokenizer.pad_token_id,
                    )
                sync()
                raw_s = time.perf_counter() - start
                raw_tokens = out[:, width:].numel()
                start = time.perf_counter()
                rollouts = sample_ids(
                    model, tokenizer, prompt_ids, settings, args.samples, seed=1, step=10_000 + repeat
                )
                sync()
                ours_s = time.perf_counter() - start
                ours_tokens = sum(len(r.response_ids) for r in rollouts)
                if repeat:  # the first round is a warm-up
                    raw.append(raw_tokens / raw_s)
                    ours.append(ours_tokens / ours_s)
                note(
                    f"generation round {repeat}: raw {raw_tokens} tok in {raw_s:.2f} s, "
                    f"sample_ids {ours_tokens} tok in {ours_s:.2f} s"
                )
        finally:
            config.min_new_tokens = saved
    return {
        "raw_generate_tokens_per_s": median(raw),
        "sample_ids_tokens_per_s": median(ours),
        "gen_efficiency": median(ours) / median(raw),
        "rows": len(rows),
        "new_tokens_per_row": args.max_new_tokens,
    }


def measure_memory(args, workdir: Path, model: Optional[str]) -> dict[str, Any]:
    """Peak memory of a short fit with the conscience every step over the same fit without it."""
    from bench.training_overhead import run_fit

    generation = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "batch_size": args.prompts * args.samples,
    }
    note(f"memory: two {args.memory_steps}-step fits (+1 warm-up), without and with the conscience every step ...")
    without = run_fit(workdir / "memory", "none", args.memory_steps, None, model)
    with_ = run_fit(workdir / "memory", "every_1", args.memory_steps, 1, model, generation=generation)
    return {
        "peak_rss_mb_without": without["peak_rss_mb"],
        "peak_rss_mb_with": with_["peak_rss_mb"],
        "memory_ratio": with_["peak_rss_mb"] / without["peak_rss_mb"],
        "peak_cuda_mb_without": without["peak_cuda_mb"],
        "peak_cuda_mb_with": with_["peak_cuda_mb"],
        "fits": [without, with_],
    }
