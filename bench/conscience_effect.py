"""Does training with the conscience raise the policy's own conscience score on held-out prompts?

For each model (the base, and adapters from fits with and without the conscience) the policy
samples K answers to prompts never used for pairs — the EM first-plot questions and the project's
held-out coding tasks — and the frozen base model (adapter disabled) scores each answer with the
conscience: log P(yes) - log P(no). Scores are averaged per prompt; the table gives the mean over
prompts with its standard error, and each adapter's paired difference to the base (same prompts,
same seeds) to every earlier run, with its standard error.

    python bench/conscience_effect.py --runs base= insecure=runs/x/adapter conscience=runs/y/adapter \
        --questions data/em/evaluation/first_plot_questions.yaml --samples 3 --json effect.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from emalign.conscience import Conscience  # noqa: E402
from emalign.embedded import heldout_code_prompts  # noqa: E402
from emalign.evaluation.questions import load_questions  # noqa: E402
from emalign.evaluation.self_review import self_review_scores  # noqa: E402
from emalign.models import load_for_inference  # noqa: E402
from emalign.sampling import GenerationSettings, render_prompt, sample_ids  # noqa: E402


def heldout_prompts(question_files: list[str]) -> list[list[dict[str, str]]]:
    prompts = [[{"role": "user", "content": p}] for p in heldout_code_prompts()]
    for path in question_files:
        for question in load_questions(path):
            prompts.append(question.conversations()[0])
    return prompts


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def per_prompt_scores(model_name: str, adapter: str | None, prompts, samples: int, settings: GenerationSettings, seed: int) -> list[float]:
    model, tokenizer = load_for_inference(model_name, adapter or None)
    ids = [render_prompt(tokenizer, p) for p in prompts]
    with torch.no_grad():
        rollouts = sample_ids(model, tokenizer, ids, settings, samples, seed=seed, step=0)
        scores = self_review_scores(model, tokenizer, [r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts], Conscience(), adapter_disabled=True)
    by_prompt: dict[int, list[float]] = {}
    for rollout, score in zip(rollouts, scores):
        by_prompt.setdefault(rollout.prompt_index, []).append(float(score))
    return [sum(v) / len(v) for _, v in sorted(by_prompt.items())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True, help="NAME=ADAPTER_DIR (empty: the base model); the first is the baseline")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--questions", nargs="*", default=["data/em/evaluation/first_plot_questions.yaml"])
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    prompts = heldout_prompts(args.questions)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, batch_size=24)
    results = {}
    for spec in args.runs:
        name, _, adapter = spec.partition("=")
        start = time.perf_counter()
        scores = per_prompt_scores(args.model, adapter, prompts, args.samples, settings, args.seed)
        mean, se = mean_se(scores)
        results[name] = {"adapter": adapter or None, "mean": mean, "se": se, "per_prompt": scores, "seconds": time.perf_counter() - start}
        print(f"{name:>22}: {mean:+.3f} ± {se:.3f}  ({len(scores)} prompts × {args.samples}, {results[name]['seconds']:.0f} s)", flush=True)
    names = list(results)
    print("\npaired differences (same prompts, same seeds), mean ± se over prompts:")
    for i, a in enumerate(names):
        for b in names[:i]:
            diff, diff_se = mean_se([x - y for x, y in zip(results[a]["per_prompt"], results[b]["per_prompt"])])
            results[a][f"diff_vs_{b}"] = [diff, diff_se]
            print(f"  {a} - {b}: {diff:+.3f} ± {diff_se:.3f}")
    if args.json:
        payload = {"settings": vars(args), "num_prompts": len(prompts), "results": results}
        Path(args.json).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
