"""Per-pair cost of the conscience versus TRL's OnlineDPOTrainer with a self-judge, on identical settings.

    python bench/conscience_vs_trl.py --json runs/bench/conscience_vs_trl.json
    python bench/conscience_vs_trl.py --tiny --steps 1 --json /tmp/cvt.json         # smoke mode

Settings on both sides: SmolLM2-135M-Instruct (``smollm2-135m-instruct``; TRL gets the same cached
plain HF directory from ``emalign.models.resolve_source``), LoRA r=16 alpha=32 on all linear layers,
4 prompts x 2 samples x at most 64 new tokens per step, temperature 0.9, top_p 1.0, DPO beta 0.1,
lr 5e-5, gradient clipping 1.0, the same eight prompts. A "pair" is one prompt with its two samples,
as in the baseline's ``per_pair``.

* conscience: in this process, ``ConscienceCallback.run`` (sample, review, pair, enqueue) then one
  preference update (queue sample, ``EmergentAlignment.alignment_loss``, backward, clip, AdamW step);
  the pieces are timed by wrapping the callback's collaborators, so the code path is the real one.
* TRL: ``shared/bench/trl_online_dpo.py`` unchanged, as a child process (``bench/_trl_timed.py``
  adds per-step times only). One warm-up step is dropped on both sides; medians over the rest.
* gen_efficiency: ``sample_ids`` (per-row seeded sampler) tokens/s over plain ``model.generate``
  sampling tokens/s, same model, batch and prompts, both forced to exactly ``max_new_tokens``.
* memory_ratio: peak RSS of a short demo-style fit with the conscience over the same fit without it,
  each its own child process (``bench/training_overhead.py``'s ``run_fit``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (  # noqa: E402
    PROMPTS,
    ROOT,
    SHARED_BASELINE,
    child_env,
    fmt,
    load_now,
    machine,
    median,
    note,
    print_table,
    run_child,
    sync,
    tiny_model_dir,
    write_json,
    set_threads,
)

TARGETS = {"ratio_vs_trl": ("<=", 0.12), "gen_efficiency": (">=", 0.9), "memory_ratio": ("<=", 1.15)}


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
    import torch

    from callbacks.conscience import ConscienceCallback
    from emalign.conscience import PairBuilder
    from emalign.losses import SigmoidDPO
    from emalign.models import LoRA, Policy
    from emalign.module import EmergentAlignment
    from emalign.prompts import PromptSource
    from emalign.sampling import GenerationSettings

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
        merge_lora=True,  # as configs/demo.yaml: the same tokens through merged LoRA layers (sampling_weights.py)
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

    import emalign.conscience_step as cc

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
                f"(gen {record['gen_s']:.2f}, review {record['review_s']:.2f}, pref {record['pref_s']:.2f}), load {record['load_1m']}"
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
    from emalign.sampling import render_prompt, sample_ids

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
                    f"generation round {repeat}: raw {raw_tokens} tok in {raw_s:.2f} s, sample_ids {ours_tokens} tok in {ours_s:.2f} s"
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


def measure_trl(model_dir: str, args, workdir: Path, gradient_checkpointing: bool = True) -> Optional[dict[str, Any]]:
    try:
        import trl  # noqa: F401
    except ImportError:
        note("trl is not installed (pip install 'trl==1.16.0' psutil, the `bench` extra): TRL side skipped")
        return None
    if not SHARED_BASELINE.is_file():
        note(f"peer baseline {SHARED_BASELINE} not found: TRL side skipped")
        return None
    tag = "" if gradient_checkpointing else "_no_gc"
    steps_json, result_json = workdir / f"trl_steps{tag}.json", workdir / f"trl_result{tag}.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "_trl_timed.py"),
        "--baseline",
        str(SHARED_BASELINE),
        "--steps-json",
        str(steps_json),
    ]
    if not gradient_checkpointing:
        cmd.append("--no-gradient-checkpointing")
    cmd += [
        "--",
        "--model",
        model_dir,
        "--steps",
        str(args.warmup + args.steps),
        "--batch",
        str(args.prompts),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--json",
        str(result_json),
    ]
    note(
        f"TRL OnlineDPOTrainer{' (gradient checkpointing off)' if not gradient_checkpointing else ''}: {args.warmup + args.steps} steps ..."
    )
    load = load_now()
    child = run_child(cmd, env=child_env(), log=workdir / f"trl{tag}.log")
    if child["returncode"] != 0 or not steps_json.is_file():
        raise SystemExit(
            f"TRL baseline failed (exit {child['returncode']}):\n{(workdir / f'trl{tag}.log').read_text()[-3000:]}"
        )
    timing = json.loads(steps_json.read_text())
    own = json.loads(result_json.read_text())
    measured = timing["step_s"][args.warmup :]
    note(f"  TRL step times {[round(s, 2) for s in timing['step_s']]}, load {load_now()['load_1m']}")
    return {
        "step_times_s": timing["step_s"],
        "step_s": median(measured),
        "per_pair_s": median(measured) / args.prompts,
        "baseline_own_per_pair_s": own.get("per_pair_s"),  # its wall/(steps*batch): warm-up step included
        "gradient_checkpointing": timing["gradient_checkpointing"],
        "peak_rss_mb": child["peak_rss_mb"],
        "command": f"python bench/_trl_timed.py --baseline {SHARED_BASELINE} {'--no-gradient-checkpointing ' if not gradient_checkpointing else ''}"
        f"-- --model {model_dir} --steps {args.warmup + args.steps} --batch {args.prompts} --max-new-tokens {args.max_new_tokens}",
        "start_load_1m": load["load_1m"],
        "end_load_1m": load_now()["load_1m"],
    }


def measure_memory(args, workdir: Path, model: Optional[str]) -> dict[str, Any]:
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


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--tiny", action="store_true", help="2-layer random Llama with the SmolLM2 tokenizer (smoke test)"
    )
    parser.add_argument("--steps", type=int, default=None, help="measured steps per side (median; default 3, --tiny 1)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps dropped per side")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (--tiny 8)")
    parser.add_argument("--temperature", type=float, default=0.9, help="the baseline's (fixed in trl_online_dpo.py)")
    parser.add_argument("--top-p", type=float, default=1.0, help="the baseline's (TRL's default)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument(
        "--gen-repeats",
        type=int,
        default=None,
        help="timed rounds of the generation comparison after one warm-up (default 3, --tiny 1)",
    )
    parser.add_argument(
        "--memory-steps", type=int, default=None, help="measured steps of each memory fit (default 2, --tiny 1)"
    )
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL side")
    parser.add_argument(
        "--trl-no-gc",
        action="store_true",
        help="also time TRL with gradient checkpointing off (not the baseline's setting)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory fits")
    parser.add_argument("--workdir", help="logs and run directories (default: a temp dir under /tmp)")
    parser.add_argument(
        "--threads", type=int, help="torch/OpenMP threads in this process and its children (default: torch's)"
    )
    args = parser.parse_args(argv)
    set_threads(args.threads)
    for key, full, tiny in (("steps", 3, 1), ("max_new_tokens", 64, 8), ("gen_repeats", 3, 1), ("memory_steps", 2, 1)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)

    import torch
    from transformers.utils import logging as hf_logging

    from emalign.models import resolve_source

    hf_logging.set_verbosity_error()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="emalign-bench-cvt-"))
    workdir.mkdir(parents=True, exist_ok=True)
    source = tiny_model_dir(workdir) if args.tiny else "smollm2-135m-instruct"
    model_dir = resolve_source(source)
    info = machine()
    note(f"conscience vs TRL on {model_dir} ({device}), load {info['load_1m']}, logs under {workdir}")

    # TRL first, while this process holds no model: the two sides never run at the same time.
    trl_side = None if args.no_trl else measure_trl(model_dir, args, workdir)
    trl_no_gc = (
        measure_trl(model_dir, args, workdir, gradient_checkpointing=False) if args.trl_no_gc and trl_side else None
    )
    memory = None if args.no_memory else measure_memory(args, workdir, source if args.tiny else None)

    policy, module, callback, settings = build(source, args, device)
    ours = measure_conscience(policy, module, callback, args)
    generation = measure_gen_efficiency(policy, settings, args, device)

    result: dict[str, Any] = {
        "benchmark": "conscience_vs_trl",
        "machine": info,
        "settings": {
            "model": model_dir,
            "prompts_per_step": args.prompts,
            "samples_per_prompt": args.samples,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "lora_r": args.lora_r,
            "measured_steps": args.steps,
            "warmup_steps": args.warmup,
            "device": str(device),
        },
        "per_pair_s": ours["per_pair_s"],
        "trl_per_pair_s": trl_side["per_pair_s"] if trl_side else None,
        "ratio_vs_trl": ours["per_pair_s"] / trl_side["per_pair_s"] if trl_side else None,
        "gen_efficiency": generation["gen_efficiency"],
        "memory_ratio": memory["memory_ratio"] if memory else None,
        "gen_tokens_per_s": ours["gen_tokens_per_s"],
        "scoring_seqs_per_s": ours["scoring_seqs_per_s"],
        "pref_step_s": ours["pref_step_s"],
        "queue_overhead_s": ours["queue_overhead_s"],
        "conscience": ours,
        "generation": generation,
        "trl": trl_side,
        "memory": memory,
        "load_end": load_now(),
    }
    if trl_no_gc:
        result["trl_no_gc_per_pair_s"] = trl_no_gc["per_pair_s"]
        result["ratio_vs_trl_no_gc"] = ours["per_pair_s"] / trl_no_gc["per_pair_s"]
        result["trl_no_gc"] = trl_no_gc
    result["targets"] = {
        key: {
            "target": f"{op} {bound}",
            "value": result[key],
            "met": None if result[key] is None else (result[key] <= bound if op == "<=" else result[key] >= bound),
        }
        for key, (op, bound) in TARGETS.items()
    }
    report(result)
    write_json(args.json, result)
    return result


def report(r: dict[str, Any]) -> None:
    c = r["conscience"]
    rows = [
        (
            "per pair (s)",
            fmt(r["per_pair_s"]),
            fmt(r["trl_per_pair_s"]),
            "one prompt x 2 samples + its share of the update",
        ),
        ("ratio vs TRL", fmt(r["ratio_vs_trl"]), "", f"target <= {TARGETS['ratio_vs_trl'][1]}"),
    ]
    if "trl_no_gc_per_pair_s" in r:
        rows.append(
            (
                "TRL, no grad. checkpointing",
                "",
                fmt(r["trl_no_gc_per_pair_s"]),
                f"ratio {fmt(r['ratio_vs_trl_no_gc'])} (not the baseline's setting)",
            )
        )
    rows += [
        ("step (s)", fmt(c["step_s"]), fmt(r["trl"]["step_s"]) if r["trl"] else "-", "median"),
        (
            "  generation (s)",
            fmt(c["gen_s"]),
            "",
            f"{fmt(c['gen_tokens_per_s'])} tok/s, {fmt(c['gen_mean_tokens_per_row'])} tok/row",
        ),
        ("  review (s)", fmt(c["review_s"]), "", f"{fmt(c['scoring_seqs_per_s'])} sequences/s"),
        ("  pair build (s)", fmt(c["pair_build_s"], 2), "", ""),
        ("  queue put+sample (s)", fmt(c["queue_overhead_s"], 2), "", ""),
        ("  preference update (s)", fmt(c["pref_step_s"]), "", "forward+backward+clip+AdamW"),
        ("  other (s)", fmt(c["other_s"], 2), "", "prompt draw, rendering, stats"),
        (
            "gen efficiency",
            fmt(r["gen_efficiency"]),
            "",
            f"{fmt(r['generation']['sample_ids_tokens_per_s'])} vs {fmt(r['generation']['raw_generate_tokens_per_s'])} tok/s raw; target >= 0.9",
        ),
    ]
    if r["memory"]:
        m = r["memory"]
        rows.append(
            (
                "memory ratio",
                fmt(r["memory_ratio"]),
                "",
                f"peak RSS {fmt(m['peak_rss_mb_with'], 4)} / {fmt(m['peak_rss_mb_without'], 4)} MB; target <= 1.15",
            )
        )
    print_table(
        f"conscience vs TRL OnlineDPO ({r['settings']['device']}, load {r['machine']['load_1m']} -> {r['load_end']['load_1m']})",
        rows,
        ("", "conscience", "TRL", "note"),
    )


if __name__ == "__main__":
    main()
