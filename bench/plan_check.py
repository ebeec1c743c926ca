"""A plan against the same step run for real: `cli.py plan` on the meta device, then the same command with
`--device cpu` (the model's weights, on this CPU) or `--device cuda` (random weights of the real shape, on a GPU),
phase by phase. Each is its own child process; the table gives each phase's planned peak, the peak the same
tracker counted in the real run, and their ratio (on a GPU also `torch.cuda.max_memory_allocated` and
`max_memory_reserved`, and what the process held beyond PyTorch's allocator: the CUDA context).

    python bench/plan_check.py --json bench/results/plan_smollm2.json                    # the demo, on this CPU
    python bench/plan_check.py --device cuda --config configs/em/insecure_conscience.yaml --variants shipped \\
        --set=--model.policy.init_args.model=.gpu/qwen7b-shape --json $OUT/plan_7b_cuda.json   # bench/plan_gpu.sh
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ROOT, bench_parser, fmt, machine, note, parse_bench_args, print_table, run_child, write_json

VARIANTS = {
    "shipped": [],
    "bf16-mixed": ["--trainer.precision=bf16-mixed"],
    "qlora": ["--model.policy.init_args.quantization={quant_type: nf4, compute_dtype: bfloat16}",
              "--model.policy.init_args.dtype=bfloat16", "--trainer.precision=bf16-mixed"],
    "no-conscience": ["--conscience=null"],
}
"""Flags added to the config for each variant."""


def plan(args, variant: str, device: str) -> dict:
    out = args.workdir / f"{variant}-{device}.json"
    flags = [a for c in args.config for a in ("--config", c)] + args.set + VARIANTS[variant]
    where = ["--target", args.device] if device == "meta" else ["--device", device]
    cmd = [sys.executable, str(ROOT / "cli.py"), "plan", *flags, *where, "--out", str(out)]
    child = run_child(cmd, log=args.workdir / f"{variant}-{device}.log")
    if child["returncode"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {args.workdir / f'{variant}-{device}.log'}")
    note(f"{variant} on {device}: {child['wall_s']:.0f} s, peak RSS {child['peak_rss_mb']:.0f} MB")
    return {**json.loads(out.read_text()), "wall_s": child["wall_s"], "peak_rss_mb": child["peak_rss_mb"]}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--config", action="append", help="fit config (repeatable; default configs/demo.yaml)")
    parser.add_argument("--set", action="append", default=[], help="a fit flag, as --set=--KEY=VALUE (repeatable)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the real run goes")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    args = parse_bench_args(parser)
    args.config = args.config or ["configs/demo.yaml"]
    results, rows = {}, []
    for variant in args.variants.split(","):
        planned, real = plan(args, variant, "meta"), plan(args, variant, args.device)
        phases = []
        for p, r in zip(planned["phases"], real["phases"]):
            assert p["name"] == r["name"], (p["name"], r["name"])
            phases.append({"phase": p["name"], "planned_gib": p["peak_gib"], "real_gib": r["peak_gib"],
                           "ratio": p["peak_gib"] / r["peak_gib"], "cuda_allocated_gib": r["allocated_gib"],
                           "cuda_reserved_gib": r["reserved_gib"], "planned_by_kind_gib": p["by_kind_gib"]})
            rows.append((variant, p["name"], fmt(p["peak_gib"]), fmt(r["peak_gib"]), fmt(p["peak_gib"] / r["peak_gib"]),
                         fmt(r["allocated_gib"]), fmt(r["reserved_gib"])))
        results[variant] = {"flags": VARIANTS[variant], "phases": phases, "planned": planned, "real": real,
                            "worst_ratio_off_by": max(abs(ph["ratio"] - 1) for ph in phases)}
    print_table(f"plan vs a real run on {args.device} ({' + '.join(args.config)})", rows,
                ("variant", "phase", "planned GiB", "real GiB", "ratio", "CUDA allocated", "CUDA reserved"))
    write_json(args.json, {"machine": machine(), "device": args.device, "config": args.config, "set": args.set,
                           "command": " ".join(sys.argv), "variants": results})


if __name__ == "__main__":
    main()
