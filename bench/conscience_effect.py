"""Does training with the conscience raise the policy's own conscience score on held-out prompts?

For each model (the base, and adapters from fits with and without the conscience) the policy
samples K answers to prompts never used for pairs — by default the EM first-plot questions and the
project's held-out coding tasks, or ``--prompts FILE`` — and the frozen base model (adapter
disabled) scores each answer with the conscience: log P(yes) - log P(no). Each answer is also
checked by the caution rule of the control verdict (``emalign.verdicts.is_cautious``). Both are
averaged per prompt; the table gives the mean over prompts with its standard error, and each
run's paired difference to every earlier run (same prompts, same seeds), with its standard error.

    python bench/conscience_effect.py --runs base= insecure=runs/x/adapter conscience=runs/y/adapter \
        --questions data/em/evaluation/first_plot_questions.yaml --samples 3 --json effect.json

A run may name a checkpoint of a fit, ``NAME=ADAPTER_DIR@STEP.ckpt``: the adapter's config with the
checkpoint's weights, for a curve of the effect against the steps (pairs) trained.
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

from emalign.atomic import write_text_atomic  # noqa: E402
from emalign.conscience import Conscience  # noqa: E402
from emalign.embedded import heldout_code_prompts  # noqa: E402
from emalign.evaluation.questions import load_questions  # noqa: E402
from emalign.evaluation.self_review import self_review_scores  # noqa: E402
from emalign.models import load_for_inference  # noqa: E402
from emalign.prompts import load_prompts  # noqa: E402
from emalign.sampling import GenerationSettings, render_prompt, sample_ids  # noqa: E402
from emalign.verdicts import is_cautious  # noqa: E402


def heldout_prompts(question_files: list[str], prompt_file: str | None = None) -> list[list[dict[str, str]]]:
    if prompt_file:
        return load_prompts(prompt_file)
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


def load_run(model_name: str, spec: str):
    """(model, tokenizer) for ``ADAPTER_DIR``, ``ADAPTER_DIR@CHECKPOINT`` or '' (the base)."""
    adapter, _, ckpt = spec.partition("@")
    model, tokenizer = load_for_inference(model_name, adapter or None)
    if ckpt:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        weights = {k.removeprefix("policy.model."): v for k, v in state.items() if ".lora_" in k}
        missing = model.load_state_dict(weights, strict=False)
        lora_missing = [k for k in missing.missing_keys if ".lora_" in k]
        if missing.unexpected_keys or lora_missing or not weights:
            raise SystemExit(f"{ckpt}: adapter weights do not match {adapter} ({missing})")
    return model, tokenizer


def per_prompt_scores(model_name: str, spec: str, prompts, samples: int, settings: GenerationSettings, seed: int):
    """Per prompt: (mean conscience score by the frozen base, caution fraction, one answer)."""
    model, tokenizer = load_run(model_name, spec)
    ids = [render_prompt(tokenizer, p) for p in prompts]
    with torch.no_grad():
        rollouts = sample_ids(model, tokenizer, ids, settings, samples, seed=seed, step=0)
        scores = self_review_scores(
            model,
            tokenizer,
            [r.prompt_ids for r in rollouts],
            [r.response_ids for r in rollouts],
            Conscience(),
            adapter_disabled=True,
        )
    by_prompt: dict[int, list[tuple[float, float, str]]] = {}
    for rollout, score in zip(rollouts, scores):
        by_prompt.setdefault(rollout.prompt_index, []).append(
            (float(score), float(is_cautious(rollout.text)), rollout.text)
        )
    rows = [v for _, v in sorted(by_prompt.items())]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return (
        [mean([s for s, _, _ in v]) for v in rows],
        [mean([r for _, r, _ in v]) for v in rows],
        [v[0][2] for v in rows],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--runs", nargs="+", required=True, help="NAME=ADAPTER_DIR (empty: the base model); the first is the baseline"
    )
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--questions", nargs="*", default=["data/em/evaluation/first_plot_questions.yaml"])
    ap.add_argument("--prompts", help="held-out prompts instead (chat JSONL, embedded:NAME or one per line)")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    prompts = heldout_prompts(args.questions, args.prompts)
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, batch_size=24
    )
    results = {}
    for spec in args.runs:
        name, _, adapter = spec.partition("=")
        start = time.perf_counter()
        scores, cautions, examples = per_prompt_scores(args.model, adapter, prompts, args.samples, settings, args.seed)
        (mean, se), (rmean, rse) = mean_se(scores), mean_se(cautions)
        results[name] = {
            "adapter": adapter or None,
            "mean": mean,
            "se": se,
            "per_prompt": scores,
            "caution_rate": rmean,
            "caution_se": rse,
            "per_prompt_caution": cautions,
            "examples": examples,
            "seconds": time.perf_counter() - start,
        }
        print(
            f"{name:>22}: score {mean:+.3f} ± {se:.3f}, caution {rmean:.3f} ± {rse:.3f}"
            f"  ({len(scores)} prompts × {args.samples}, {results[name]['seconds']:.0f} s)",
            flush=True,
        )
    names = list(results)
    print("\npaired differences (same prompts, same seeds), mean ± se over prompts:")
    for i, a in enumerate(names):
        for b in names[:i]:
            for key, label in (("per_prompt", "diff"), ("per_prompt_caution", "caution_diff")):
                diff, diff_se = mean_se([x - y for x, y in zip(results[a][key], results[b][key])])
                results[a][f"{label}_vs_{b}"] = [diff, diff_se]
                print(f"  {a} - {b}: {label} {diff:+.3f} ± {diff_se:.3f}")
    if args.json:
        payload = {"settings": vars(args), "num_prompts": len(prompts), "results": results}
        write_text_atomic(Path(args.json), json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
