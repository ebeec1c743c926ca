"""What two defaults cost: ``checkpoint_pairs`` (the pairs' decoder layers recomputed in backward) and
``check_head`` (one 4-token forward at every model load).

    python bench/defaults_cost.py --threads 1 --json bench/results/defaults_cost.json   # SmolLM2
    python bench/defaults_cost.py --tiny                                                # smoke mode

``checkpoint_pairs``: demo-style fits (``training_overhead.run_fit``: configs/demo.yaml, one process each,
a warm-up step dropped) with the conscience every step, so that every measured step trains on pairs, with
``--model.checkpoint_pairs`` true and false, interleaved, ``--repeats`` fits each. Per variant: the median
step time over all its measured steps and the highest peak RSS of its fits; then false / true ratios.
``check_head``: in this process, the median of 20 calls on the loaded model against the median wall time of
``load_causal_lm`` (which makes that call once), 3 loads.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (  # noqa: E402
    bench_parser, fmt, machine, median, note, parse_bench_args, print_table, timed, tiny_model_dir, write_json,
)
from bench.training_overhead import run_fit  # noqa: E402


def checkpoint_pairs(work: Path, model: str | None, steps: int, repeats: int) -> dict:
    runs: dict[str, list[dict]] = {"true": [], "false": []}
    for repeat in range(repeats):
        for value in runs:
            note(f"checkpoint_pairs={value}, fit {repeat + 1}/{repeats}")
            runs[value].append(run_fit(work, f"pairs_{value}_{repeat}", steps, every=1, model=model,
                                       extra=("--model.checkpoint_pairs", value)))
    out = {value: {"step_s_median": median(s for fit in fits for s in fit["step_s"][1:]),
                   "peak_rss_mb": max(fit["peak_rss_mb"] for fit in fits), "fits": fits}
           for value, fits in runs.items()}
    out["time_ratio_false_vs_true"] = out["false"]["step_s_median"] / out["true"]["step_s_median"]
    out["memory_ratio_false_vs_true"] = out["false"]["peak_rss_mb"] / out["true"]["peak_rss_mb"]
    return out


def check_head_cost(model: str) -> dict:
    from emalign.models.logprobs import check_head
    from emalign.models.policy import load_causal_lm

    loads = [timed(load_causal_lm, model)[1] for _ in range(3)]
    lm = load_causal_lm(model)
    checks = [timed(check_head, lm)[1] for _ in range(20)]
    return {"load_s_median": median(loads), "check_s_median": median(checks), "loads_s": loads,
            "share_of_load": median(checks) / median(loads)}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--steps", type=int, default=6, help="measured steps per fit (one warm-up step is added)")
    parser.add_argument("--repeats", type=int, default=2, help="fits per variant, interleaved")
    args = parse_bench_args(parser)
    work = args.workdir
    model = tiny_model_dir(work) if args.tiny else None  # None: the demo's own model
    result = {"machine": machine(), "model": model or "smollm2-135m-instruct",
              "checkpoint_pairs": checkpoint_pairs(work, model, args.steps, args.repeats),
              "check_head": check_head_cost(model or "smollm2-135m-instruct")}
    pairs, head = result["checkpoint_pairs"], result["check_head"]
    print_table("checkpoint_pairs (conscience every step)", [
        (value, fmt(pairs[value]["step_s_median"]), fmt(pairs[value]["peak_rss_mb"])) for value in ("true", "false")
    ], ("checkpoint_pairs", "median step s", "peak RSS MB"))
    print(f"false / true: time {pairs['time_ratio_false_vs_true']:.2f}x, "
          f"memory {pairs['memory_ratio_false_vs_true']:.2f}x")
    print(f"check_head: {head['check_s_median'] * 1000:.1f} ms of a {head['load_s_median']:.2f} s load "
          f"({head['share_of_load']:.1%})")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
