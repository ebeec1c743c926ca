"""`cli.py plan` on every shipped fit config: the planned GPU peak per config for the configs tables (README.md and
configs/README.md quote this file's numbers, marked as planned). Each plan is its own child process.

    python bench/plan_configs.py --json bench/results/plan_configs.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ROOT, bench_parser, fmt, machine, note, parse_bench_args, print_table, run_child, write_json

CONFIGS = {
    "demo": ["configs/demo.yaml"],
    "demo --conscience null": ["configs/demo.yaml", "--conscience=null"],
    "adversarial": ["configs/adversarial.yaml"],
    "em/insecure": ["configs/em/insecure.yaml"],
    "em/insecure_conscience": ["configs/em/insecure_conscience.yaml"],
}
"""Name -> the config files (each after --config) and flags of a plan."""


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--gpu_memory", type=float, default=24.0, help="GiB the verdicts are for")
    args = parse_bench_args(parser)
    plans, rows = {}, []
    for name, parts in CONFIGS.items():
        out = args.workdir / f"{name.replace('/', '_').replace(' ', '_')}.json"
        flags = [a for p in parts for a in (("--config", p) if p.endswith(".yaml") else (p,))]
        cmd = [sys.executable, str(ROOT / "cli.py"), "plan", *flags, "--gpu_memory", str(args.gpu_memory),
               "--out", str(out)]
        child = run_child(cmd, log=out.with_suffix(".log"))
        if child["returncode"] != 0:
            raise SystemExit(f"{' '.join(cmd)} failed; see {out.with_suffix('.log')}")
        note(f"{name}: {child['wall_s']:.0f} s, peak RSS {child['peak_rss_mb']:.0f} MB")
        plan = json.loads(out.read_text())
        plans[name] = {"command": " ".join(["python cli.py plan", *flags]), "wall_s": child["wall_s"],
                       "peak_rss_mb": child["peak_rss_mb"], "plan": plan}
        rows.append((name, fmt(plan["peak_gib"]), plan["peak_phase"], fmt(plan["needed_gib"]),
                     "fits" if plan["fits"] else "does not fit", fmt(child["wall_s"])))
    print_table(f"planned peak GPU memory (GiB; verdict for {args.gpu_memory:g} GiB)", rows,
                ("config", "traced peak", "in phase", "with allowance", "verdict", "plan s"))
    write_json(args.json, {"machine": machine(), "command": " ".join(sys.argv), "gpu_memory_gib": args.gpu_memory,
                           "configs": plans})


if __name__ == "__main__":
    main()
