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
    "adversarial": ["configs/adversarial.yaml", "--conscience.prompts.init_args.path={em}/data/jailbroken.jsonl"],
    "em/insecure": ["configs/em/insecure.yaml"],
    "em/insecure_conscience": ["configs/em/insecure_conscience.yaml"],
}
"""Name -> the config files (each after --config) and flags of a plan; ``{em}``: the EM data (``--em_data``)."""


PHASES = ["conscience: sampling", "conscience: review", "train: task", "train: task + pairs", "optimizer step"]


def markdown_table(result: dict) -> str:
    """The configs table's planned rows (configs/README.md holds this text; a test regenerates it from the JSON)."""
    head = ("| config | sampling | review | task | task + pairs (or pairs) | optimizer | traced peak | with allowance "
            f"| {result['gpu_memory_gib']:g} GiB GPU |")
    lines = [head, "|---" * 9 + "|"]
    for name, entry in result["configs"].items():
        plan = entry["plan"]
        peaks = {p["name"].replace("train: pairs", "train: task + pairs"): p["peak_gib"] for p in plan["phases"]}
        cells = [f"{peaks[p]:.2f}" if p in peaks else "-" for p in PHASES]
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {plan['peak_gib']:.2f} | {plan['needed_gib']:.2f} | "
                     + ("fits" if plan["fits"] else "does not fit") + " |")
    return "\n".join(lines)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--gpu_memory", type=float, default=24.0, help="GiB the verdicts are for")
    found = next((d for d in ("data/em", "../shared/data/em") if Path(ROOT, d).is_dir()), "data/em")
    parser.add_argument("--em_data", default=found, help="`cli.py data em`'s directory (adversarial's prompts)")
    args = parse_bench_args(parser)
    plans, rows = {}, []
    for name, parts in CONFIGS.items():
        out = args.workdir / f"{name.replace('/', '_').replace(' ', '_')}.json"
        parts = [p.replace("{em}", str(Path(ROOT, args.em_data).resolve())) for p in parts]
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
    result = {"machine": machine(), "command": " ".join(sys.argv), "gpu_memory_gib": args.gpu_memory,
              "configs": plans}
    print(markdown_table(result))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
