"""Which weights to decode through: LoRA layers as they are, merged into one linear, or int8 copies.

    python bench/sampling_weights.py --json bench/results/sampling_weights.json
    python bench/sampling_weights.py --tiny --json /tmp/sw.json                     # smoke mode

Same rollouts for every variant: ``sample_ids`` on the conscience bench's settings (SmolLM2 with LoRA
r=16 on all seven projections, 4 prompts x 2 samples, at most 64 new tokens, temperature 0.9, one
thread), the same seeds. The adapter's B matrices are drawn from N(0, 0.01) so that it changes the
model, as a trained one does (a fresh adapter is zero and merging it would be trivially exact).

* ``separate``: the LoRA layers as they are (base, A and B products per call).
* ``merged``: ``GenerationSettings(merge_lora=True)`` (``emalign.merge``).
* ``int8`` (probe, not shipped): every linear, head included, swapped for fbgemm's dynamically
  quantized int8 linear of the merged weights (weights per output channel, activations per call).

Per variant: seconds (median of ``--repeats``, the weight swap included), tokens/s, and the median over
repeats of each repeat's separate/variant time ratio (the variants run interleaved); against
``separate``: rows with identical tokens, and on ``separate``'s samples (teacher forced) the mean
per-token KL(separate || variant) and top-1 agreement; and the mean per-token negative log-likelihood
that the ``separate`` model gives each variant's samples (a different sampler shows up as a higher one).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (  # noqa: E402
    PROMPTS, machine, median, note, print_table, set_threads, tiny_model_dir, write_json,
)
from emalign.merge import merged_adapter, swap_modules  # noqa: E402
from emalign.models import LoRA, Policy  # noqa: E402
from emalign.sampling import GenerationSettings, render_prompt, sample_ids  # noqa: E402


class Int8Linear(torch.nn.Module):
    """fbgemm's int8 linear: weights symmetric per output channel, activations quantized per call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1).clamp_min(1e-12) / 127).double()
        with warnings.catch_warnings():  # quantized tensors are deprecated after torch 2.13
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(q, None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range: 7-bit activations, which fbgemm's AVX2 kernels need to avoid overflow
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, True).to(x.dtype)


@contextmanager
def int8_weights(model):
    """Every linear (LoRA layers merged first) swapped for an int8 copy; the originals back on exit."""
    with merged_adapter(model), torch.no_grad():
        found = {n: Int8Linear(m.weight, m.bias) for n, m in model.named_modules() if type(m) is torch.nn.Linear}
        originals = swap_modules(model, found)
        try:
            yield model
        finally:
            swap_modules(model, originals)


def int8_sample(model, tok, prompt_ids, settings):
    with int8_weights(model):
        return sample_ids(model, tok, prompt_ids, settings, 2, seed=0)


def token_stats(model, reference_rollouts, variant_ctx) -> dict:
    """Teacher-forced KL(model || variant) and top-1 agreement on the reference rollouts' responses."""
    kls, agree = [], []
    with torch.no_grad():
        for r in reference_rollouts:
            ids = torch.tensor([r.prompt_ids + r.response_ids])
            at = slice(len(r.prompt_ids) - 1, ids.shape[1] - 1)
            p = F.log_softmax(model(ids).logits[0, at].float(), -1)
            with variant_ctx():
                q = F.log_softmax(model(ids).logits[0, at].float(), -1)
            kls.append((p.exp() * (p - q)).sum(-1))
            agree.append((p.argmax(-1) == q.argmax(-1)).float())
    return {"kl_per_token": torch.cat(kls).mean().item(), "top1_agreement": torch.cat(agree).mean().item()}


def nll(model, rollouts) -> list[float]:
    """Mean per-token negative log-likelihood of each rollout's response under ``model``."""
    out = []
    with torch.no_grad():
        for r in rollouts:
            ids = torch.tensor([r.prompt_ids + r.response_ids])
            logp = F.log_softmax(model(ids).logits[0, len(r.prompt_ids) - 1 : -1].float(), -1)
            out.append(-logp.gather(-1, torch.tensor(r.response_ids)[:, None]).mean().item())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model (smoke mode)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="emalign-sw-"))
    source = tiny_model_dir(workdir) if args.tiny else "smollm2-135m-instruct"
    torch.manual_seed(0)
    policy = Policy(source, adapter=LoRA(r=16, alpha=32))
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.01)
    tok = policy.tokenizer
    prompt_ids = [render_prompt(tok, [{"role": "user", "content": p}]) for p in PROMPTS[:4]]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=0.9, top_p=1.0, batch_size=8)
    merged = GenerationSettings(**{**vars(settings), "merge_lora": True})
    with policy.generating() as model:
        variants = {
            "separate": lambda: sample_ids(model, tok, prompt_ids, settings, 2, seed=0),
            "merged": lambda: sample_ids(model, tok, prompt_ids, merged, 2, seed=0),
            "int8": lambda: int8_sample(model, tok, prompt_ids, settings),
        }
        variants["separate"]()  # warm-up: first-call costs out of the timings
        runs = {name: [] for name in variants}
        for repeat in range(args.repeats):  # interleaved, so that drifting load hits every variant alike
            for name, fn in variants.items():
                start = time.perf_counter()
                rollouts = fn()
                runs[name].append((time.perf_counter() - start, rollouts))
                note(f"{name} repeat {repeat}: {runs[name][-1][0]:.2f} s")
        reference = runs["separate"][0][1]
        contexts = {
            "separate": nullcontext,
            "merged": lambda: merged_adapter(model),
            "int8": lambda: int8_weights(model),
        }
        result = {
            "benchmark": "sampling_weights",
            "machine": machine(),
            "settings": {
                "model": source,
                "rows": len(reference),
                "max_new_tokens": args.max_new_tokens,
                "repeats": args.repeats,
                "lora_r": 16,
                "lora_b_std": 0.01,
                "threads": args.threads,
            },
            "variants": {},
        }
        for name, timed in runs.items():
            seconds = [s for s, _ in timed]
            rollouts = timed[0][1]
            tokens = sum(len(r.response_ids) for r in rollouts)
            nlls = nll(model, rollouts)
            result["variants"][name] = {
                "seconds": median(seconds),
                "all_seconds": seconds,
                "tokens": tokens,
                "tokens_per_s": tokens / median(seconds),
                "identical_rows": sum(a.response_ids == b.response_ids for a, b in zip(rollouts, reference)),
                "nll_under_separate_mean": sum(nlls) / len(nlls),
                "nll_under_separate_rows": nlls,
                **token_stats(model, reference, contexts[name]),
            }
    base = result["variants"]["separate"]
    for row in result["variants"].values():
        row["speedup_tokens_per_s"] = row["tokens_per_s"] / base["tokens_per_s"]
        # Each repeat's ratio, separate over variant, then the median: drifting load cancels within a repeat.
        row["speedup_paired_median"] = median(a / b for a, b in zip(base["all_seconds"], row["all_seconds"]))
    print_table(
        "sampling weights",
        [
            (
                n,
                f"{v['seconds']:.2f}",
                f"{v['tokens_per_s']:.1f}",
                f"{v['speedup_tokens_per_s']:.2f}x",
                f"{v['speedup_paired_median']:.2f}x",
                f"{v['identical_rows']}/{len(reference)}",
                f"{v['kl_per_token']:.2e}",
                f"{v['top1_agreement']:.3f}",
                f"{v['nll_under_separate_mean']:.3f}",
            )
            for n, v in result["variants"].items()
        ],
        ("variant", "s", "tok/s", "speedup", "paired", "same rows", "KL/token", "top-1 agree", "NLL under separate"),
    )
    write_json(args.json, result)


if __name__ == "__main__":
    main()
