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
* shared_prefill      ``sample_ids`` prefilling each prompt once for its samples  vs  once per sample
                      (``GenerationSettings.share_prefill``); ``shared_prefill_long_prompts``: the same
                      prompts after a 1,600-character code context
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
from bench._generation_rows import generation_rows  # noqa: E402
from bench._update_rows import review_rows, update_rows  # noqa: E402


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

    from emalign.models import LoRA, Policy
    from emalign.sampling import GenerationSettings, render_prompt

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
    rows: dict[str, Any] = {}
    wanted = lambda name: not args.only or name in args.only  # noqa: E731
    note(f"optimisations on {source} ({device}), load {info['load_1m']}")

    def measure(name: str, before: str, after: str, before_fn: Callable[[], Any], after_fn: Callable[[], Any], **extra):
        """Time ``before_fn`` against ``after_fn`` and keep the row under ``name``."""
        result = bench_pair(before_fn, after_fn, args.repeats)
        rows[name] = {"before": before, "after": after, **result, **extra}
        note(
            f"{name}: before {result['before_s']:.3f} s, after {result['after_s']:.3f} s, x{result['speedup']:.2f}"
            f" (load {result['load_1m']})"
        )

    rollouts = generation_rows(policy, prompt_ids, settings, args, device, wanted, measure)
    review = review_rows(policy, rollouts, wanted, measure)
    update_rows(policy, rollouts, review, device, wanted, measure)

    result = {
        "benchmark": "optimisations",
        "machine": info,
        "settings": {
            "model": source,
            "prompts": args.prompts,
            "samples": args.samples,
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
