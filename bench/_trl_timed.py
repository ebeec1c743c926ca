"""Run the peer baseline (shared/bench/trl_online_dpo.py) unchanged, adding only per-step wall times.

    python bench/_trl_timed.py --baseline PATH --steps-json OUT [--no-gradient-checkpointing] -- BASELINE ARGS...

The baseline's ``OnlineDPOTrainer`` is swapped for a subclass that registers a ``TrainerCallback``
timing each optimizer step (``on_step_begin`` .. ``on_step_end``: generation, self-judge, policy and
reference forwards, backward, optimizer step). Everything else, settings included, is the baseline's.
``--no-gradient-checkpointing`` (an extra variant, not the baseline) turns off TRL's default gradient
checkpointing, which also turns the KV cache off during its generation.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import resource
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--steps-json", required=True)
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    args, rest = parser.parse_known_args()
    rest = [a for a in rest if a != "--"]

    spec = importlib.util.spec_from_file_location("trl_online_dpo", args.baseline)
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    from transformers import TrainerCallback

    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)

    class TimedTrainer(baseline.OnlineDPOTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.add_callback(StepTimes())
            self.bench_gradient_checkpointing = bool(self.args.gradient_checkpointing)

    baseline.OnlineDPOTrainer = TimedTrainer
    if args.no_gradient_checkpointing:
        baseline.OnlineDPOConfig = functools.partial(baseline.OnlineDPOConfig, gradient_checkpointing=False)
    sys.argv = [args.baseline, *rest]
    baseline.main()
    with open(args.steps_json, "w") as handle:
        json.dump({"step_s": times, "peak_rss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                   "gradient_checkpointing": not args.no_gradient_checkpointing}, handle)


if __name__ == "__main__":
    main()
