"""Per-pair cost of the conscience versus TRL's OnlineDPOTrainer with a self-judge, on identical settings.

    python bench/conscience_vs_trl.py --json runs/bench/conscience_vs_trl.json
    python bench/conscience_vs_trl.py --tiny --steps 1 --json /tmp/cvt.json         # smoke mode

Settings on both sides: SmolLM2-135M-Instruct (``smollm2-135m-instruct``; TRL gets the same cached
plain HF directory from ``emalign.models.sources.resolve_source``), LoRA r=16 alpha=32 on all linear layers,
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

import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (  # noqa: E402
    bench_parser, fmt, load_now, machine, note, parse_bench_args, print_table, tiny_model_dir, write_json,
)
from bench._conscience_side import build, measure_conscience, measure_gen_efficiency, measure_memory  # noqa: E402
from bench._trl_side import measure_trl  # noqa: E402

TARGETS = {"ratio_vs_trl": ("<=", 0.12), "gen_efficiency": (">=", 0.9), "memory_ratio": ("<=", 1.15)}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = bench_parser(__doc__.splitlines()[0])
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
    args = parse_bench_args(parser, argv)
    for key, full, tiny in (("steps", 3, 1), ("max_new_tokens", 64, 8), ("gen_repeats", 3, 1), ("memory_steps", 2, 1)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)

    import torch
    from transformers.utils import logging as hf_logging

    from emalign.models.sources import resolve_source

    hf_logging.set_verbosity_error()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workdir = args.workdir
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
            f"{fmt(r['generation']['sample_ids_tokens_per_s'])} vs "
            f"{fmt(r['generation']['raw_generate_tokens_per_s'])} tok/s raw; target >= 0.9",
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
        f"conscience vs TRL OnlineDPO ({r['settings']['device']}, "
        f"load {r['machine']['load_1m']} -> {r['load_end']['load_1m']})",
        rows,
        ("", "conscience", "TRL", "note"),
    )


if __name__ == "__main__":
    main()
