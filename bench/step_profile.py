"""Where a conscience step's time goes: each phase of ``conscience_vs_trl.py``'s step, split by operator kind.

    python bench/step_profile.py --json bench/results/step_profile.json
    python bench/step_profile.py --tiny --steps 1 --json /tmp/profile.json            # smoke mode

The step is the one ``bench/conscience_vs_trl.py`` times (same model, settings and code path:
``_conscience_side.build``): generation (``sample_ids``), review (``Conscience.review``), the preference
update's forward (``alignment_loss``) and backward, and the optimizer step. Each phase runs under
``torch.profiler``; its operators' own CPU time is summed into kinds:

* ``matmul``: ``aten::mm``/``addmm``/``bmm``, the weight products (and attention's batched products);
* ``attention``: the fused scaled-dot-product kernels, forward and backward;
* ``other_ops``: every other operator (norms, activations, rotary, the KV cache's concatenations,
  the sampler, log-softmax, the optimizer's arithmetic);
* ``outside_ops``: wall time no operator accounts for (Python, HF ``generate``'s loop, the profiler).

The same pairs then go through the update once more with ``checkpoint_pairs`` off, so the price of
recomputing the pairs' layers in backward shows on its own (``update_no_recompute``).

``matmul`` summed over a step is a floor for it on this machine at these settings: the products are
what the step computes, and they run in MKL already. Against the budget ``ratio_vs_trl`` <= 0.12 gives
(``--trl-step-s``, TRL's median step from ``bench/results/conscience_vs_trl_merged.json`` by default),
it says how much room the rest has. The profiler adds a little to every operator, so phase walls here
run slightly above ``conscience_vs_trl.py``'s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (  # noqa: E402
    ROOT,
    machine,
    median,
    note,
    print_table,
    set_threads,
    tiny_model_dir,
    write_json,
)

KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
}
PHASES = ("gen", "review", "update_forward", "update_backward", "optimizer")
TRL_RESULT = ROOT / "bench" / "results" / "conscience_vs_trl_merged.json"


def profiled(fn, *args, **kwargs) -> tuple[object, dict[str, float]]:
    """``fn(*args, **kwargs)`` under the profiler: its result and its wall time split into kinds."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        wall = time.perf_counter() - start
    split = {kind: 0.0 for kind in KINDS} | {"other_ops": 0.0}
    for event in prof.key_averages():
        kind = next((k for k, names in KINDS.items() if event.key in names), "other_ops")
        split[kind] += event.self_cpu_time_total / 1e6
    split["outside_ops"] = max(0.0, wall - sum(split.values()))
    split["wall"] = wall
    return result, split


def profile_step(module, callback, optimizer, params, step: int) -> dict[str, dict[str, float]]:
    import torch

    import emalign.conscience_step as cc

    phases: dict[str, dict[str, float]] = {}

    def wrap(name, fn):
        def run(*args, **kwargs):
            result, phases[name] = profiled(fn, *args, **kwargs)
            return result

        return run

    sample_ids, review = cc.sample_ids, callback.conscience.review
    cc.sample_ids, callback.conscience.review = wrap("gen", sample_ids), wrap("review", review)
    try:
        callback.run(module, step)
    finally:
        cc.sample_ids, callback.conscience.review = sample_ids, review
    pairs = module.pair_queue.sample(module.pairs_per_step, step)
    loss, phases["update_forward"] = profiled(module.alignment_loss, pairs)
    _, phases["update_backward"] = profiled(loss.backward)

    def optimizer_step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    _, phases["optimizer"] = profiled(optimizer_step)
    optimizer.zero_grad(set_to_none=True)
    checkpointing, module.checkpoint_pairs = module.checkpoint_pairs, False  # the same pairs, activations kept
    try:
        loss, forward = profiled(module.alignment_loss, pairs)
        _, backward = profiled(loss.backward)
    finally:
        module.checkpoint_pairs = checkpointing
        optimizer.zero_grad(set_to_none=True)
    phases["update_no_recompute"] = {k: forward[k] + backward[k] for k in forward}
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model (smoke mode)")
    parser.add_argument("--steps", type=int, default=2, help="measured steps (median), after one warm-up step")
    parser.add_argument("--threads", type=int, default=1, help="as conscience_vs_trl.py's results were taken")
    parser.add_argument("--trl-step-s", type=float, default=None,
                        help=f"TRL's median step in s for the budget (default: from {TRL_RESULT.name})")
    parser.add_argument("--json", default=None)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    import torch

    from bench._conscience_side import build

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="emalign-profile-"))
    source = tiny_model_dir(workdir) if args.tiny else "smollm2-135m-instruct"
    settings = types.SimpleNamespace(lora_r=16, prompts=4, samples=2, max_new_tokens=8 if args.tiny else 64,
                                     temperature=0.9, top_p=1.0)
    _, module, callback, _ = build(source, settings, torch.device("cpu"))
    params = [p for p in module.policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5)
    module.train()
    steps = []
    for step in range(1 + args.steps):
        phases = profile_step(module, callback, optimizer, params, step)
        note(f"step {step}{' (warm-up)' if step == 0 else ''}: "
             + ", ".join(f"{name} {phases[name]['wall']:.2f} s" for name in PHASES))
        steps.append(phases)
    measured = steps[1:]
    table = {name: {k: median(s[name][k] for s in measured) for k in measured[0][name]}
             for name in (*PHASES, "update_no_recompute")}
    step_total = {k: sum(table[name][k] for name in PHASES) for k in table["gen"]}
    trl_step = args.trl_step_s
    if trl_step is None and TRL_RESULT.is_file():
        trl_step = json.loads(TRL_RESULT.read_text())["trl"]["step_s"]
    recompute = {k: table["update_forward"][k] + table["update_backward"][k] - table["update_no_recompute"][k]
                 for k in step_total}
    result = {
        "benchmark": "step_profile",
        "machine": machine(),
        "settings": {"model": source, **vars(settings), "threads": args.threads, "measured_steps": args.steps},
        "phases": table,
        "step": step_total,
        "recompute": recompute,
        "steps": steps,
        "trl_step_s": trl_step,
        "budget_s": None if trl_step is None else 0.12 * trl_step,
        "trl_step_source": None if args.trl_step_s is not None or trl_step is None else str(TRL_RESULT.name),
    }
    kinds = ("wall", "matmul", "attention", "other_ops", "outside_ops")
    rows = [(name, *(f"{table[name][k]:.2f}" for k in kinds)) for name in (*PHASES, "update_no_recompute")]
    rows.append(("step", *(f"{step_total[k]:.2f}" for k in kinds)))
    print_table("seconds per phase (median)", rows, ("phase", *kinds))
    if result["budget_s"] is not None:
        note(f"budget at ratio 0.12: {result['budget_s']:.1f} s per step (TRL {trl_step:.1f} s); the step's "
             f"products alone {step_total['matmul']:.1f} s, {step_total['matmul'] - recompute['matmul']:.1f} s "
             "without the pairs' recompute")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
