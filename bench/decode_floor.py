"""The floor under CPU decoding: the time of a decode step's weight products alone.

    python bench/decode_floor.py --json bench/results/decode_floor.json
    python bench/decode_floor.py --tiny --json /tmp/floor.json                      # smoke mode

A decoding step of 8 rows multiplies an [8, in] activation by every weight matrix of the model once:
each decoder layer's projections and the vocabulary head. This script runs exactly those products
(``torch.nn.functional.linear`` on the model's own fp32 weights, in model order, one thread) and
nothing else: no attention, norms, cache, sampler or Python around them. Whatever else decoding
does adds to it, so ``floor_s_per_64_steps`` bounds from below how fast exact fp32 decoding of 64
tokens can be here. Median over ``--repeats`` blocks of ``--steps`` steps after a warm-up block.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine, median, note, set_threads, tiny_model_dir, write_json  # noqa: E402
from emalign.models import load_causal_lm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model (smoke mode)")
    parser.add_argument("--rows", type=int, default=8, help="rows decoded together (the conscience bench's 8)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per timed block")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="emalign-floor-"))
    source = tiny_model_dir(workdir) if args.tiny else "smollm2-135m-instruct"
    model = load_causal_lm(source, "float32", None, False)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]  # the head last: model order
    inputs = {n: torch.randn(args.rows, n) for n in {m.in_features for m in linears}}

    def block() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(args.steps):
                for m in linears:
                    torch.nn.functional.linear(inputs[m.in_features], m.weight, m.bias)
        return (time.perf_counter() - start) / args.steps

    block()  # warm-up
    steps = [block() for _ in range(args.repeats)]
    head = model.get_output_embeddings()
    head_s = median(
        _time(lambda: torch.nn.functional.linear(inputs[head.in_features], head.weight), 20)
        for _ in range(args.repeats)
    )
    weights_mb = sum(m.weight.numel() for m in linears) * 4 / 2**20
    result = {
        "benchmark": "decode_floor",
        "machine": machine(),
        "settings": {
            "model": source,
            "rows": args.rows,
            "steps": args.steps,
            "repeats": args.repeats,
            "threads": args.threads,
            "linears": len(linears),
        },
        "step_s": median(steps),
        "all_step_s": steps,
        "head_s": head_s,
        "floor_s_per_64_steps": 64 * median(steps),
        "weights_mb": weights_mb,
        "weights_gb_per_s": weights_mb / 1024 / median(steps),
    }
    note(
        f"{len(linears)} products per step ({weights_mb:.0f} MB of fp32 weights): {1e3 * median(steps):.1f} ms "
        f"(head {1e3 * head_s:.1f} ms), {result['weights_gb_per_s']:.2f} GB/s; 64 steps >= "
        f"{result['floor_s_per_64_steps']:.1f} s"
    )
    write_json(args.json, result)


def _time(fn, calls: int) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(calls):
            fn()
    return (time.perf_counter() - start) / calls


if __name__ == "__main__":
    main()
