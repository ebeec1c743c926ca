"""Are the conscience's chosen answers less coherent than its rejected ones?

Coherence proxy: the frozen base model's mean per-token log-probability of an answer given its
prompt (higher: more fluent, more like what the model would say). For every pair a fit wrote to
``rollouts.jsonl`` (rows with role chosen/rejected of one step and prompt), the paired difference
chosen − rejected, mean ± se over pairs, and the share of pairs whose chosen answer is the less
likely one. A loop that rewards incoherence shows a clearly negative difference.

    python bench/pair_coherence.py runs/harmful_conscience/rollouts.jsonl runs/control_caution/rollouts.jsonl \
        --json bench/results/pair_coherence.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from emalign.atomic import write_text_atomic  # noqa: E402
from emalign.conscience import reference_logps  # noqa: E402
from emalign.models import load_for_inference  # noqa: E402
from emalign.sampling import render_prompt  # noqa: E402


def pairs_of(path: Path) -> list[tuple[dict, dict]]:
    """(chosen row, rejected row) per (step, prompt), in file order."""
    groups: dict[tuple[int, str], dict[str, dict]] = {}
    for line in path.open(encoding="utf-8"):
        row = json.loads(line)
        if row["role"] in ("chosen", "rejected"):
            groups.setdefault((row["step"], row["prompt"]), {})[row["role"]] = row
    return [(g["chosen"], g["rejected"]) for g in groups.values() if len(g) == 2]


def per_token_logps(model, tokenizer, rows: list[dict], batch: int = 16) -> list[float]:
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in rows]
    answers = [tokenizer(r["response"], add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
               for r in rows]
    out = []
    for i in range(0, len(rows), batch):
        sums = reference_logps(model, tokenizer, prompts[i : i + batch], answers[i : i + batch])
        out += [float(s) / len(a) for s, a in zip(sums, answers[i : i + batch])]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rollouts", nargs="+", help="rollouts.jsonl files of fits")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    model, tokenizer = load_for_inference(args.model)
    results = {}
    with torch.no_grad():
        for path in args.rollouts:
            pairs = pairs_of(Path(path))
            chosen = per_token_logps(model, tokenizer, [c for c, _ in pairs])
            rejected = per_token_logps(model, tokenizer, [r for _, r in pairs])
            diffs = [c - r for c, r in zip(chosen, rejected)]
            n = len(diffs)
            mean = sum(diffs) / n
            se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)
            less = sum(d < 0 for d in diffs) / n
            results[path] = {"pairs": n, "chosen_mean": sum(chosen) / n, "rejected_mean": sum(rejected) / n,
                             "diff": mean, "diff_se": se, "chosen_less_likely": less}
            print(f"{path}: {n} pairs, per-token log-prob chosen {sum(chosen) / n:.3f}, rejected "
                  f"{sum(rejected) / n:.3f}, chosen − rejected {mean:+.3f} ± {se:.3f}; "
                  f"chosen less likely in {less:.0%}")
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
