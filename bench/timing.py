"""StepTimer: a Lightning callback that records every training step's wall time and the peak memory of a fit.

Used by ``bench/training_overhead.py`` (as the first callback, so its ``on_train_batch_start`` runs
before the conscience's): a step's time spans the conscience (when it runs), the training step, the
optimizer step and anything else between two ``on_train_batch_start`` hooks.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import lightning as L
import torch


class StepTimer(L.Callback):
    def __init__(self, out: str = "step_times.json") -> None:
        self.out = out
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.fit_start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.fit_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        # Step i runs from its batch start to the next batch start (the optimizer step and every hook
        # in between included); the last step ends at its batch end.
        bounds = self.starts + [self.ends[-1]] if self.ends else self.starts
        steps = [b - a for a, b in zip(bounds, bounds[1:])]
        data = {
            "step_s": steps,
            "train_s": time.perf_counter() - self.fit_start,
            "peak_rss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        }
        Path(self.out).parent.mkdir(parents=True, exist_ok=True)
        Path(self.out).write_text(json.dumps(data))
