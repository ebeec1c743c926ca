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
def test_optimisations_tiny(tmp_path):
    data = run_bench("optimisations.py", tmp_path / "opt.json", "--repeats", "1", "--max-new-tokens", "6")
    rows = ["batched_rows", "stop_at_eos", "kv_cache_generation", "gc_off_generation", "sampler",
            "sampler_call_8x49152", "sampler_vs_plain", "lora_unmerged_generation", "last_position_verdict",
            "shared_review_pass", "cached_ref_logps", "concat_forward", "shared_prefill", "shared_prefill_long_prompts"]
    assert_finite(data, [f"speedup_{row}" for row in rows])
    for row in rows:
        assert_finite(data["rows"][row], ["before_s", "after_s"])


@pytest.mark.slow
def test_allocator_probe_tiny(tmp_path):
    data = run_bench("allocator_probe.py", tmp_path / "alloc.json", "--steps", "2", "--modes", "default", "thresh")
    assert set(data["modes"]) == {"default", "thresh"}
    for mode in data["modes"].values():
        assert [r["pair"] for r in mode["steps"]] == [False, True]
        for row in mode["steps"]:
            assert_finite(row, ["seconds", "rss_mb", "maxrss_mb"])


@pytest.mark.slow
def test_decode_floor_tiny(tmp_path):
    data = run_bench("decode_floor.py", tmp_path / "floor.json", "--steps", "2", "--repeats", "2")
    assert_finite(data, ["step_s", "head_s", "floor_s_per_64_steps", "weights_gb_per_s"])
    assert data["settings"]["linears"] == 2 * 7 + 1  # 2 layers x 7 projections + the head
    assert len(data["all_step_s"]) == 2  # --repeats
    assert data["floor_s_per_64_steps"] == pytest.approx(64 * data["step_s"], rel=0.05)  # JSON rounds to 4 digits


@pytest.mark.slow
def test_step_profile_tiny(tmp_path):
    data = run_bench("step_profile.py", tmp_path / "profile.json", "--steps", "1", "--trl-step-s", "100")
    phases = ["gen", "review", "update_forward", "update_backward", "optimizer"]
    assert set(data["phases"]) == {*phases, "update_no_recompute"}
    for name in phases:
        assert_finite(data["phases"][name], ["wall", "matmul", "attention", "other_ops", "outside_ops"])
        parts = sum(data["phases"][name][k] for k in ("matmul", "attention", "other_ops", "outside_ops"))
        assert parts == pytest.approx(data["phases"][name]["wall"], abs=2e-3)  # the kinds split the wall time
    assert data["phases"]["gen"]["matmul"] > 0 and data["phases"]["update_backward"]["matmul"] > 0
    assert data["step"]["wall"] == pytest.approx(sum(data["phases"][n]["wall"] for n in phases), abs=2e-3)
    assert data["budget_s"] == pytest.approx(12.0) and data["trl_step_source"] is None
    assert len(data["steps"]) == 2  # the warm-up step is kept in the JSON, left out of the medians


@pytest.mark.slow
def test_sampling_weights_tiny(tmp_path):
    data = run_bench("sampling_weights.py", tmp_path / "sw.json", "--repeats", "1", "--max-new-tokens", "6")
    assert set(data["variants"]) == {"separate", "merged", "int8"}
    for row in data["variants"].values():
        assert_finite(row, ["seconds", "tokens_per_s", "speedup_paired_median", "kl_per_token",
                            "nll_under_separate_mean"])
    merged = data["variants"]["merged"]
    assert merged["identical_rows"] == data["settings"]["rows"] == 8 and merged["kl_per_token"] < 1e-6


@pytest.mark.slow
def test_prompt_bound_tiny(tmp_path):
    """The benchmark runs end to end and the bounded eval peaks within 1.5x of the short one. (The tiny
    model's attention is too small for the unbounded run to blow up; with SmolLM2 it does:
    bench/results/prompt_bound.json. test_eval_faults checks the bound itself: at most 1024 prompt tokens.)"""
    data = run_bench("prompt_bound.py", tmp_path / "prompt_bound.json", "--variants", "short", "huge_bounded")
    assert_finite(data, ["ratio_bounded_vs_short"])
    assert data["ratio_bounded_vs_short"] <= 1.5, data


@pytest.mark.slow
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_seeded_sampler_draws_from_the_warped_distribution(top_p):
    """The cheaper sampler the benchmarks led to (one uniform per row and token) is still an exact, seeded draw."""
    import torch

    from emalign.sampling import SeededSampler

    # 307 tokens (not a multiple of the search block), masked tokens between the live ones.
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf"), 0.5] + [float("-inf")] * 300 + [1.5]])
    sampler = SeededSampler([11, 12], temperature=0.9, top_p=top_p, device=torch.device("cpu"))
    n = 20000
    counts = torch.zeros(logits.shape[1])
    for _ in range(n // 2):
        out = sampler(None, logits.expand(2, -1).clone())
        assert int(torch.isfinite(out).sum()) == 2  # one finite score per row: greedy takes the draw
        counts.index_add_(0, out.argmax(-1), torch.ones(2))
    warped = logits / 0.9
    if top_p < 1.0:
        ordered, order = warped.sort(descending=True)
        drop = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1) > top_p
        warped = warped.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    expected = warped.softmax(-1)[0]
    live = expected > 0
    assert counts[~live].sum() == 0
    z = (counts[live] / n - expected[live]) / (expected[live] * (1 - expected[live]) / n).sqrt()
    assert z.abs().max() < 5

    again = SeededSampler([11, 12], temperature=0.9, top_p=top_p, device=torch.device("cpu"))
    first = SeededSampler([11, 12], temperature=0.9, top_p=top_p, device=torch.device("cpu"))
    assert all(torch.equal(first(None, logits.expand(2, -1).clone()), again(None, logits.expand(2, -1).clone()))
               for _ in range(20))
