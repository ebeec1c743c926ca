"""Training overhead of the conscience: steps/s and peak memory of a short demo-style fit, with the
conscience every N steps versus without it.

    python bench/training_overhead.py --json runs/bench/training_overhead.json            # N in {1, 4, 16}
    python bench/training_overhead.py --tiny --steps 2 --every 1 --json /tmp/to.json       # smoke mode
    # the 7B EM recipe (QLoRA) on a GPU, random weights of Qwen2.5-7B's shape:
    python bench/training_overhead.py --config configs/em/insecure.yaml --config configs/em/insecure_conscience.yaml \
        --shape qwen2.5-7b --every 4 --steps 8 --set=--trainer.accumulate_grad_batches=1

Each variant is ``python cli.py fit --config CONFIG... --config VARIANT.yaml`` in its own process
(by default configs/demo.yaml: SmolLM2-135M-Instruct, LoRA r=16, embedded data). The variant YAML
replaces the callback list (``bench.timing.StepTimer`` first, then the configs' own conscience with
its period set to N, unless the variant has none), turns
off validation, checkpointing, logging and the progress bar, and sets ``max_steps = steps + 1``: the
first step is a warm-up and is dropped, so the measured steps hold exactly steps / N conscience
runs. Peak memory is the child's peak RSS (``os.wait4``) and, on a GPU, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from bench._common import (
    ROOT, SHAPES, bench_parser, child_env, fmt, load_now, machine, median, note, parse_bench_args, print_table,
    random_model_dir, run_child, tiny_model_dir, write_json,
)  # noqa: E402

DEMO = ROOT / "configs" / "demo.yaml"


def config_conscience(configs: tuple[Path, ...] = (DEMO,)) -> dict[str, Any]:
    """The conscience settings (the ``conscience`` section) of the last config that has one."""
    found = None
    for path in configs:
        found = yaml.safe_load(path.read_text()).get("conscience") or found
    if found is None:
        raise SystemExit(f"none of {[str(p) for p in configs]} has a conscience section")
    return found


def run_fit(
    workdir: Path,
    name: str,
    steps: int,
    every: Optional[int],
    model: Optional[str] = None,
    generation: Optional[dict[str, Any]] = None,
    accelerator: str = "cpu",
    extra: tuple[str, ...] = (),
    configs: tuple[Path, ...] = (DEMO,),
) -> dict[str, Any]:
    """One demo-style fit of ``steps`` measured steps (+1 warm-up) in its own process; its timings and peak memory."""
    run_dir = workdir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    times = run_dir / "step_times.json"
    times.unlink(missing_ok=True)
    callbacks: list[dict[str, Any]] = [{"class_path": "bench.timing.StepTimer", "init_args": {"out": str(times)}}]
    conscience = None if every is None else {"every_n_steps": every}
    if conscience is not None and generation:
        conscience["generation"] = generation
    variant = {
        "conscience": conscience,  # merged onto the configs' conscience; None: none
        "trainer": {
            "accelerator": accelerator,
            "max_steps": steps + 1,
            "default_root_dir": str(run_dir),
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "limit_val_batches": 0,
            "callbacks": callbacks,
        }
    }
    if model:
        variant["model"] = {"policy": {"init_args": {"model": model}}}
    config = run_dir / "variant.yaml"
    config.write_text(yaml.safe_dump(variant, sort_keys=False))
    config_args = [arg for path in configs for arg in ("--config", str(path))]
    cmd = [sys.executable, str(ROOT / "cli.py"), "fit", *config_args, "--config", str(config), *extra]
    load = load_now()
    result = run_child(cmd, env=child_env(), log=run_dir / "fit.log")
    if result["returncode"] != 0 or not times.is_file():
        tail = (run_dir / "fit.log").read_text()[-3000:]
        raise SystemExit(f"fit {name} failed (exit {result['returncode']}); log {run_dir / 'fit.log'}:\n{tail}")
    import json

    timing = json.loads(times.read_text())
    measured = timing["step_s"][1:]  # the first step is the warm-up
    return {
        "name": name,
        "every_n_steps": every,
        "measured_steps": len(measured),
        "conscience_runs": 0 if every is None else sum(1 for s in range(1, len(measured) + 1) if s % every == 0),
        "steps_per_s": len(measured) / sum(measured) if measured else float("nan"),
        "step_s_median": median(measured),
        "step_s": timing["step_s"],
        "warmup_step_s": timing["step_s"][0] if timing["step_s"] else None,
        "fit_wall_s": result["wall_s"],
        "peak_rss_mb": result["peak_rss_mb"],
        "peak_cuda_mb": timing.get("peak_cuda_mb"),
        "command": " ".join(["python", "cli.py", "fit", *(_relative(a) for a in config_args), "--config",
                             f"<{name}/variant.yaml>", *extra]),
        "variant_yaml": variant,
        **{f"start_{k}": v for k, v in load.items()},
        **{f"end_{k}": v for k, v in load_now().items()},
    }


def _relative(arg: str) -> str:
    path = Path(arg)
    return str(path.relative_to(ROOT)) if path.is_absolute() and path.is_relative_to(ROOT) else arg


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16, help="measured steps per variant (one warm-up step is added)")
    parser.add_argument(
        "--every", type=int, nargs="+", default=[1, 4, 16], help="conscience periods N to compare with no conscience"
    )
    parser.add_argument(
        "--config", action="append", type=Path, help="fit config(s), in order (default: configs/demo.yaml)"
    )
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), help="random weights of this real architecture instead of the config's model"
    )
    parser.add_argument("--tokenizer", default="smollm2-135m-instruct", help="tokenizer source for --shape models")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="--KEY=VALUE",
        help="extra CLI override for every fit (repeatable)",
    )
    parser.add_argument("--accelerator", default=None, help="cpu or gpu (default: gpu when CUDA is available)")
    args = parse_bench_args(parser, argv)

    import torch

    accelerator = args.accelerator or ("gpu" if torch.cuda.is_available() else "cpu")
    workdir = args.workdir
    configs = tuple(Path(c).resolve() for c in args.config or [DEMO])  # the fits run from the repository root
    config_conscience(configs)  # fail on a config without a conscience before building a (7B) model
    if args.tokenizer and Path(args.tokenizer).exists():
        args.tokenizer = str(Path(args.tokenizer).resolve())
    model = (
        tiny_model_dir(workdir)
        if args.tiny
        else random_model_dir(workdir, args.shape, args.tokenizer)
        if args.shape
        else None
    )
    info = machine()
    note(
        f"training overhead: {args.steps} measured steps per variant, N in {args.every}, load {info['load_1m']}, "
        f"runs under {workdir}"
    )
    variants: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "benchmark": "training_overhead",
        "machine": info,
        "settings": {
            "model": args.shape or model or "config's",
            "measured_steps": args.steps,
            "every": args.every,
            "accelerator": accelerator,
            "conscience": config_conscience(configs),
            "configs": [_relative(str(c)) for c in configs],
            "overrides": args.set,
        },
        "variants": variants,
    }
    for every in [None, *args.every]:
        name = "none" if every is None else f"every_{every}"
        note(f"fit {name} ...")
        variants.append(
            run_fit(
                workdir, name, args.steps, every, model, accelerator=accelerator, extra=tuple(args.set), configs=configs
            )
        )
        v = variants[-1]
        note(f"  {name}: {v['steps_per_s']:.4f} steps/s, peak RSS {v['peak_rss_mb']:.0f} MB, load {v['end_load_1m']}")
        summarise(result)
        write_json(args.json, result)  # after every variant: a stopped run keeps what it measured
    base = variants[0]
    rows = [
        (
            v["name"],
            fmt(v["steps_per_s"], 4),
            fmt(v["step_s_median"]),
            str(v["conscience_runs"]),
            fmt(base["steps_per_s"] / v["steps_per_s"]),
            fmt(v["peak_rss_mb"], 4),
            fmt(v["peak_cuda_mb"], 4),
            f"{v['start_load_1m']}/{v['end_load_1m']}",
        )
        for v in variants
    ]
    print_table(
        f"training overhead ({info['cpu_count']} CPU, {accelerator}, {args.steps} measured steps)",
        rows,
        (
            "variant",
            "steps/s",
            "median step s",
            "conscience runs",
            "slowdown",
            "peak RSS MB",
            "peak CUDA MB",
            "load start/end",
        ),
    )
    write_json(args.json, result)
    return result


def summarise(result: dict[str, Any]) -> None:
    variants = result["variants"]
    base = variants[0]
    for v in variants:
        result[f"steps_per_s_{v['name']}"] = v["steps_per_s"]
        result[f"peak_rss_mb_{v['name']}"] = v["peak_rss_mb"]
        if v["peak_cuda_mb"] is not None:
            result[f"peak_cuda_mb_{v['name']}"] = v["peak_cuda_mb"]
        if v is not base:
            result[f"slowdown_{v['name']}"] = base["steps_per_s"] / v["steps_per_s"]
            result[f"memory_ratio_{v['name']}"] = v["peak_rss_mb"] / base["peak_rss_mb"]
    result["load_end"] = load_now()


if __name__ == "__main__":
    main()
