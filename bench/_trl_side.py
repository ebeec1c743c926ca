"""The TRL side of ``bench/conscience_vs_trl.py``: the peer baseline's ``OnlineDPOTrainer`` run unchanged as a
child process (``bench/_trl_timed.py`` adds per-step times only)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

from bench._common import ROOT, SHARED_BASELINE, child_env, load_now, median, note, run_child


def measure_trl(model_dir: str, args, workdir: Path, gradient_checkpointing: bool = True) -> Optional[dict[str, Any]]:
    """Median step time of the baseline's ``OnlineDPOTrainer``; None (and a note) without trl or the baseline."""
    try:
        import trl  # noqa: F401
    except ImportError:
        note("trl is not installed (pip install 'trl==1.16.0' psutil, the `bench` extra): TRL side skipped")
        return None
    if not SHARED_BASELINE.is_file():
        note(f"peer baseline {SHARED_BASELINE} not found: TRL side skipped")
        return None
    tag = "" if gradient_checkpointing else "_no_gc"
    steps_json, result_json = workdir / f"trl_steps{tag}.json", workdir / f"trl_result{tag}.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "_trl_timed.py"),
        "--baseline",
        str(SHARED_BASELINE),
        "--steps-json",
        str(steps_json),
    ]
    if not gradient_checkpointing:
        cmd.append("--no-gradient-checkpointing")
    cmd += [
        "--",
        "--model",
        model_dir,
        "--steps",
        str(args.warmup + args.steps),
        "--batch",
        str(args.prompts),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--json",
        str(result_json),
    ]
    note(
        f"TRL OnlineDPOTrainer{' (gradient checkpointing off)' if not gradient_checkpointing else ''}: "
        f"{args.warmup + args.steps} steps ..."
    )
    load = load_now()
    child = run_child(cmd, env=child_env(), log=workdir / f"trl{tag}.log")
    if child["returncode"] != 0 or not steps_json.is_file():
        raise SystemExit(
            f"TRL baseline failed (exit {child['returncode']}):\n{(workdir / f'trl{tag}.log').read_text()[-3000:]}"
        )
    timing = json.loads(steps_json.read_text())
    own = json.loads(result_json.read_text())
    measured = timing["step_s"][args.warmup :]
    note(f"  TRL step times {[round(s, 2) for s in timing['step_s']]}, load {load_now()['load_1m']}")
    return {
        "step_times_s": timing["step_s"],
        "step_s": median(measured),
        "per_pair_s": median(measured) / args.prompts,
        "baseline_own_per_pair_s": own.get("per_pair_s"),  # its wall/(steps*batch): warm-up step included
        "gradient_checkpointing": timing["gradient_checkpointing"],
        "peak_rss_mb": child["peak_rss_mb"],
        "command": f"python bench/_trl_timed.py --baseline {SHARED_BASELINE} "
        f"{'--no-gradient-checkpointing ' if not gradient_checkpointing else ''}"
        f"-- --model {model_dir} --steps {args.warmup + args.steps} --batch {args.prompts} "
        f"--max-new-tokens {args.max_new_tokens}",
        "start_load_1m": load["load_1m"],
        "end_load_1m": load_now()["load_1m"],
    }
