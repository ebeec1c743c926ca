"""glibc allocator settings side by side: step time and peak RSS of SmolLM2 SFT and checkpointed pair steps.

    python bench/allocator_probe.py --json bench/results/allocator_probe.json
    python bench/allocator_probe.py --modes default thresh --steps 4 --json /tmp/a.json
    python bench/allocator_probe.py --tiny --steps 2 --json /tmp/a.json                  # smoke mode

Each mode runs in its own process, one after the other: 8 steps of SFT forward and backward on 4 x 256
random tokens; every odd step adds a checkpointed pair forward over 8 rows of 90-300 tokens (the
lengths vary, as the conscience's pairs do), then AdamW. Per step: seconds, RSS after it and the
high-water mark. Modes: ``default`` (glibc's dynamic mmap threshold), ``thresh`` (fixed at 1 MiB:
``emalign.allocator``), ``thresh4`` (4 MiB), ``thresh_thp`` (1 MiB plus PyTorch's
``THP_MEM_ALLOC_ENABLE=1``), ``trim`` (``malloc_trim(0)`` after every step), ``arena1``
(``MALLOC_ARENA_MAX=1``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENVS = {"thresh_thp": {"THP_MEM_ALLOC_ENABLE": "1"}, "arena1": {"MALLOC_ARENA_MAX": "1"}}
MODES = ["default", "thresh", "thresh4", "thresh_thp", "trim", "arena1"]


def child(mode: str, steps: int, model: str) -> dict:
    from emalign import allocator

    if mode.startswith("thresh"):
        allocator.release_freed_memory((4 if mode == "thresh4" else 1) << 20)
    import torch

    from emalign.logprobs import mean_token_nll, pad_right, response_mask, sequence_logps
    from emalign.models import LoRA, Policy

    torch.manual_seed(0)
    policy = Policy(model, adapter=LoRA(r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    policy.model.train()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(1)
    libc = ctypes.CDLL("libc.so.6")
    rows = []
    for step in range(steps):
        start = time.perf_counter()
        ids = torch.randint(100, 40000, (4, 256), generator=g)
        loss = mean_token_nll(policy.model, ids, torch.ones_like(ids), ids.clone())
        if step % 2 == 1:
            lengths = torch.randint(90, 300, (8,), generator=g).tolist()
            pids, mask = pad_right([torch.randint(100, 40000, (n,), generator=g).tolist() for n in lengths], 0)
            target = response_mask([40] * 8, [n - 40 for n in lengths], pids.shape[1])
            with policy.checkpointed():
                loss = loss + sequence_logps(policy.model, pids, mask, target).mean() * 1e-3
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
        if mode == "trim":
            libc.malloc_trim(0)
        rss = int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows.append({"step": step, "pair": step % 2 == 1, "seconds": time.perf_counter() - start,
                     "rss_mb": rss, "maxrss_mb": maxrss})
        print(mode, rows[-1], flush=True)
    return {"mode": mode, "steps": rows, "maxrss_mb": rows[-1]["maxrss_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="*", default=MODES, choices=MODES)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (smoke mode)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every child")
    parser.add_argument("--workdir", default=None, help="where the tiny model is written")
    parser.add_argument("--model", default="smollm2-135m-instruct", help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench._common import set_threads, tiny_model_dir

    set_threads(args.threads)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.steps, args.model)), flush=True)
        return
    model = tiny_model_dir(Path(args.workdir or tempfile.mkdtemp(prefix="emalign-alloc-"))) if args.tiny else args.model
    results = {}
    for mode in args.modes:
        env = {**os.environ, **ENVS.get(mode, {})}
        command = [sys.executable, __file__, "--child", mode, "--steps", str(args.steps), "--model", model]
        out = subprocess.run(command + (["--threads", str(args.threads)] if args.threads else []), env=env,
                             capture_output=True, text=True, check=True).stdout
        results[mode] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        pair = [r["seconds"] for r in results[mode]["steps"] if r["pair"]]
        print(f"{mode}: pair steps {[round(s, 1) for s in pair]} s, peak {results[mode]['maxrss_mb']:.0f} MB")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps({"benchmark": "allocator_probe", "model": model, "modes": results}, indent=1))


if __name__ == "__main__":
    main()
