"""The benchmarks run end to end in their tiny mode and write JSON with finite numbers (never a speed check).

    pytest tests/test_bench_smoke.py -q
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT

HAS_TRL = importlib.util.find_spec("trl") is not None
HAS_BASELINE = (ROOT.parent / "shared" / "bench" / "trl_online_dpo.py").is_file()


def run_bench(script: str, out, *args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--tiny", "--threads", "1", "--json", str(out),
         "--workdir", str(out.parent / "work"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def assert_finite(data: dict, keys: list[str]) -> None:
    for key in keys:
        assert key in data, f"missing {key}"
        value = data[key]
        assert isinstance(value, (int, float)) and math.isfinite(value), f"{key}={value!r}"


@pytest.mark.slow
def test_conscience_vs_trl_tiny(tmp_path):
    args = ["--steps", "1", "--memory-steps", "1", "--gen-repeats", "1", "--max-new-tokens", "6"]
    if not (HAS_TRL and HAS_BASELINE):
        args.append("--no-trl")
    data = run_bench("conscience_vs_trl.py", tmp_path / "cvt.json", *args)
    assert_finite(data, ["per_pair_s", "gen_efficiency", "memory_ratio", "gen_tokens_per_s", "scoring_seqs_per_s",
                         "pref_step_s", "queue_overhead_s"])
    if HAS_TRL and HAS_BASELINE:
        assert_finite(data, ["trl_per_pair_s", "ratio_vs_trl"])
    else:
        assert data["trl_per_pair_s"] is None and data["ratio_vs_trl"] is None
    assert set(data["targets"]) == {"ratio_vs_trl", "gen_efficiency", "memory_ratio"}


@pytest.mark.slow
def test_training_overhead_tiny(tmp_path):
    data = run_bench("training_overhead.py", tmp_path / "overhead.json", "--steps", "1", "--every", "1")
    assert_finite(data, ["steps_per_s_none", "steps_per_s_every_1", "peak_rss_mb_none", "peak_rss_mb_every_1",
                         "slowdown_every_1", "memory_ratio_every_1"])
    assert [v["name"] for v in data["variants"]] == ["none", "every_1"]
    assert data["variants"][1]["conscience_runs"] == 1


@pytest.mark.slow
def test_prompt_bound_tiny(tmp_path):
    """The benchmark runs end to end and the bounded eval peaks within 1.5x of the short one. (The tiny
    model's attention is too small for the unbounded run to blow up; with SmolLM2 it does:
    bench/results/prompt_bound.json. test_eval_faults checks the bound itself: at most 1024 prompt tokens.)"""
    data = run_bench("prompt_bound.py", tmp_path / "prompt_bound.json", "--variants", "short", "huge_bounded")
    assert_finite(data, ["ratio_bounded_vs_short"])
    assert data["ratio_bounded_vs_short"] <= 1.5, data


@pytest.mark.slow
def test_defaults_cost_tiny(tmp_path):
    data = run_bench("defaults_cost.py", tmp_path / "defaults.json", "--steps", "1", "--repeats", "1")
    pairs, head = data["checkpoint_pairs"], data["check_head"]
    for value in ("true", "false"):
        assert_finite(pairs[value], ["step_s_median", "peak_rss_mb"])
        assert pairs[value]["fits"][0]["conscience_runs"] == 1  # every measured step trains on pairs
    assert_finite(pairs, ["time_ratio_false_vs_true", "memory_ratio_false_vs_true"])
    assert_finite(head, ["load_s_median", "check_s_median", "share_of_load"])
    assert 0 < head["check_s_median"] < head["load_s_median"]  # the load includes one check

