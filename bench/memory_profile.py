"""Where the demo fit's memory goes: peak RSS per phase, with and without the conscience, side by side.

    python bench/memory_profile.py --threads 1 --json bench/results/memory_demo.json   # the full demo, 30 steps
    python bench/memory_profile.py --steps 9 --env MALLOC_ARENA_MAX=2 --json /tmp/m.json  # an allocator setting
    python bench/memory_profile.py --without ReleaseFreedMemory --json /tmp/m.json     # glibc's default
    python bench/memory_profile.py --tiny --steps 2 --json /tmp/m.json                   # smoke mode

Each variant is ``python cli.py fit --config configs/demo.yaml --config VARIANT.yaml`` in its own process,
one after the other. The variant keeps the demo as it is (validation, checkpoints, CSV logger) and only
puts ``PhaseMemory`` first in the callback list (and ``--conscience null`` for ``none``), writes
under the work dir and, with ``--steps``, shortens the fit. The overall peak is the child's peak RSS
(``os.wait4``). ``PhaseMemory`` labels what the process is doing (generation, review, preference
forward, SFT forward, backward, optimizer step, validation) by wrapping those functions in the child,
samples its RSS every 5 ms, and records per phase: the highest RSS sampled, how much the process's
high-water mark (``ru_maxrss``) rose inside it (so the phase that set the final peak is known exactly),
and the bytes autograd saved for backward during the forward phases (the activations: which tensors).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import yaml  # noqa: E402

from bench._common import (  # noqa: E402
    ROOT, bench_parser, child_env, fmt, load_now, machine, note, parse_bench_args, print_table, run_child,
    tiny_model_dir, write_json,
)

DEMO = ROOT / "configs" / "demo.yaml"
_PAGE = 4096


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE / 2**20


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class PhaseMemory(L.Callback):
    """Peak RSS per phase of a fit, written as JSON at the end of training."""

    def __init__(self, out: str = "memory_phases.json", interval_s: float = 0.005) -> None:
        self.out = out
        self.interval_s = interval_s
        self.stack: list[str] = ["startup"]
        self.phases: dict[str, dict[str, float]] = {}
        self._opened: list[tuple[float, float]] = []  # per open phase: (high-water mark, clock) at entry
        self._stop = threading.Event()

    # --- labelling -------------------------------------------------------------------------------
    def _stats(self, name: str) -> dict[str, float]:
        empty = {"count": 0, "peak_rss_mb": 0.0, "maxrss_rise_mb": 0.0, "saved_for_backward_mb": 0.0, "seconds": 0.0}
        return self.phases.setdefault(name, empty)

    def _enter(self, name: str) -> None:
        self.stack.append(name)
        self._stats(name)["count"] += 1
        self._opened.append((_maxrss_mb(), time.perf_counter()))

    def _exit(self) -> None:
        name = self.stack.pop()
        high_water, clock = self._opened.pop()
        stats = self._stats(name)
        stats["maxrss_rise_mb"] += _maxrss_mb() - high_water
        stats["seconds"] += time.perf_counter() - clock
        stats["rss_after_mb"] = _rss_mb()

    @contextmanager
    def phase(self, name: str, count_saved: bool = False) -> Iterator[None]:
        import torch

        self._enter(name)
        try:
            if not count_saved:
                yield
                return
            storages: dict[int, int] = {}

            def pack(t: torch.Tensor) -> torch.Tensor:
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                yield
            stats = self._stats(name)
            stats["saved_for_backward_mb"] = max(stats["saved_for_backward_mb"], sum(storages.values()) / 2**20)
        finally:
            self._exit()

    def _wrap(self, owner: Any, attribute: str, name: str, count_saved: bool = False) -> None:
        original = getattr(owner, attribute)

        def wrapped(*args, **kwargs):
            if self.stack[-1] == "validation":  # the validation loss is validation, not training
                return original(*args, **kwargs)
            with self.phase(name, count_saved):
                return original(*args, **kwargs)

        setattr(owner, attribute, wrapped)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss = _rss_mb()
            stats = self._stats(self.stack[-1])
            stats["peak_rss_mb"] = max(stats["peak_rss_mb"], rss)

    # --- hooks -----------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import importlib

        import emalign.conscience.verdict
        import emalign.training.module

        self.stack = ["setup"]
        # Whichever module runs the conscience step calls ``sample_ids`` by its imported name.
        for name in ("emalign.callbacks.conscience", "emalign.conscience.step"):
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            if hasattr(module, "sample_ids"):
                self._wrap(module, "sample_ids", "generation")
        self._wrap(emalign.conscience.verdict.Conscience, "review", "review")
        self._wrap(emalign.training.module, "mean_token_nll", "sft_forward", count_saved=True)
        self._wrap(type(pl_module), "alignment_loss", "preference_forward", count_saved=True)
        threading.Thread(target=self._sample, daemon=True).start()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.stack = ["step_other"]  # the conscience (a callback after this one) labels its own parts

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._enter("backward")

    def on_after_backward(self, trainer, pl_module) -> None:
        self._exit()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._enter("optimizer_step")  # closed at the batch end (the step runs between the two hooks)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.stack[-1] == "optimizer_step":
            self._exit()
        self.stack = ["between_steps"]

    def on_validation_start(self, trainer, pl_module) -> None:
        self._enter("validation")

    def on_validation_end(self, trainer, pl_module) -> None:
        self._exit()
        self.stack = ["between_steps"]

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop.set()
        peaks = {name: stats["peak_rss_mb"] for name, stats in self.phases.items()}
        data = {"peak_rss_self_mb": _maxrss_mb(), "peak_phase": max(peaks, key=peaks.get), "phases": self.phases}
        Path(self.out).parent.mkdir(parents=True, exist_ok=True)
        Path(self.out).write_text(json.dumps(data))


def demo_callbacks(configs: tuple[Path, ...], without: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The last config's callback list, minus the classes named in ``without``."""
    found: list[dict[str, Any]] = []
    for path in configs:
        found = (yaml.safe_load(path.read_text()).get("trainer") or {}).get("callbacks") or found
    return [c for c in found if c["class_path"].rsplit(".", 1)[-1] not in without]


def run_variant(
    workdir: Path, name: str, conscience: bool, args: argparse.Namespace, configs: tuple[Path, ...]
) -> dict[str, Any]:
    run_dir = workdir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "memory_phases.json"
    out.unlink(missing_ok=True)
    trainer: dict[str, Any] = {
        "default_root_dir": str(run_dir),
        "enable_progress_bar": False,
        "callbacks": [{"class_path": "bench.memory_profile.PhaseMemory", "init_args": {"out": str(out)}}]
        + [c for c in demo_callbacks(configs, tuple(args.without))
           if not c["class_path"].endswith("ProgressBar")],
    }
    if args.steps:
        trainer["max_steps"] = args.steps
    trainer["logger"] = {
        "class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": "logs"}
    }
    variant = {"trainer": trainer, **({} if conscience else {"conscience": None})}
    if args.tiny:
        variant["model"] = {"policy": {"init_args": {"model": args.tiny_model}}}
    config = run_dir / "variant.yaml"
    config.write_text(yaml.safe_dump(variant, sort_keys=False))
    given = [a for p in configs for a in ("--config", str(p))]
    cmd = [sys.executable, str(ROOT / "cli.py"), "fit", *given, "--config", str(config), *args.set]
    env = child_env(**dict(kv.split("=", 1) for kv in args.env))
    load = load_now()
    result = run_child(cmd, env=env, log=run_dir / "fit.log")
    if result["returncode"] != 0 or not out.is_file():
        log = run_dir / "fit.log"
        raise SystemExit(f"fit {name} failed (exit {result['returncode']}); log {log}:\n{log.read_text()[-3000:]}")
    return {"name": name, "conscience": conscience, **result, **json.loads(out.read_text()), "variant_yaml": variant,
            **{f"start_{k}": v for k, v in load.items()}, **{f"end_{k}": v for k, v in load_now().items()}}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="max_steps (default: the config's, 30 for the demo)")
    parser.add_argument("--config", nargs="*", type=Path, default=[DEMO],
                        help="configs of the fit (default: configs/demo.yaml)")
    parser.add_argument("--variants", nargs="*", default=["none", "conscience"], choices=["none", "conscience"])
    parser.add_argument("--env", nargs="*", default=[], help="KEY=VALUE set in both children (e.g. MALLOC_ARENA_MAX=2)")
    parser.add_argument("--without", nargs="*", default=[], metavar="CLASS",
                        help="drop these callbacks of the config from both fits (ReleaseFreedMemory: glibc's default)")
    parser.add_argument("--set", nargs="*", default=[],
                        help="extra cli.py arguments for both fits, e.g. --set=--model.checkpoint_pairs=false")
    args = parse_bench_args(parser, argv)
    workdir = args.workdir
    args.tiny_model = tiny_model_dir(workdir) if args.tiny else None
    configs = tuple(args.config)
    runs = {name: run_variant(workdir, name, name == "conscience", args, configs) for name in args.variants}
    result: dict[str, Any] = {"machine": machine(), "configs": [str(p) for p in configs], "env": args.env,
                              "without": args.without, "set": args.set, "steps": args.steps, "runs": runs}
    if "none" in runs and "conscience" in runs:
        result["peak_rss_ratio"] = runs["conscience"]["peak_rss_mb"] / runs["none"]["peak_rss_mb"]
    def peak(phase: str) -> float:
        return max(r["phases"].get(phase, {}).get("peak_rss_mb", 0) for r in runs.values())

    def cell(stats: dict[str, float]) -> str:
        return (f"{fmt(stats['peak_rss_mb'], 4)} (+{fmt(stats['maxrss_rise_mb'], 3)}, "
                f"saved {fmt(stats['saved_for_backward_mb'], 3)})")

    names = sorted({p for run in runs.values() for p in run["phases"]}, key=lambda p: -peak(p))
    rows = [(p, *(cell(r["phases"][p]) if p in r["phases"] else "-" for r in runs.values())) for p in names]
    rows.append(("overall peak RSS MB (wait4)", *(fmt(r["peak_rss_mb"], 4) for r in runs.values())))
    print_table("peak RSS MB per phase (+ high-water rise inside it, autograd saved MB)", rows, ("phase", *runs))
    if "peak_rss_ratio" in result:
        note(f"peak RSS ratio conscience / none: {result['peak_rss_ratio']:.3f}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
