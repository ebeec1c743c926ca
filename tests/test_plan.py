"""``cli.py plan``: the memory tracker, the CUDA emulations, and the plan against a real run of the same step."""

import json

import pytest
import torch
from test_faults import fit_args

from conftest import ROOT, run_cli
from emalign.conscience.step import ConscienceStep
from emalign.conscience.verdict import Conscience, PairBuilder
from emalign.models.policy import LoRA, Policy, Quantization
from emalign.models.sampling import GenerationSettings
from emalign.planning.cuda import EmulatedAutocast
from emalign.planning.meta import MetaPolicy, model_config
from emalign.planning.step import Shapes, run_step
from emalign.planning.tracker import LiveMemory
from emalign.training.module import EmergentAlignment


def test_the_tracker_counts_each_storage_once_until_it_is_freed():
    memory = LiveMemory(vocab_size=7)
    with memory, memory.phase("p") as phase:
        a = torch.zeros(1000)  # 4000 bytes
        view = a[:10]  # the same storage
        b = torch.ones(10, 7)  # last dimension = vocab: logits, 280 bytes
        assert memory.live == 4280 and memory.by_kind["logits"] == 280
        del a
        assert memory.live == 4280  # the view holds the storage
        del view
        assert memory.live == 280
        memory.retag([b], "kv cache")
        assert memory.by_kind["kv cache"] == 280 and memory.by_kind["logits"] == 0
        del b
    assert memory.live == 0 and phase.peak == 4280 and phase.at_peak["activations"] == 4000


def test_on_meta_data_dependent_ops_are_answered_by_the_stated_assumptions():
    memory = LiveMemory(vocab_size=7)
    mask = torch.empty(3, 5, dtype=torch.bool, device="meta")
    with memory:
        assert mask.nonzero().shape == (15, 2)  # every position
        assert bool(mask.any()) is True
        assert mask.float().cpu().device.type == "meta"


def test_emulated_autocast_makes_the_choices_real_autocast_makes_where_cpu_and_cuda_agree():
    """On CPU tensors, against torch's own CPU autocast, for ops on both devices' lists (the GPU script checks the
    rest)."""
    w = torch.randn(8, 8, requires_grad=True)
    x, target = torch.randn(4, 8), torch.tensor([1, 2, 3, 0])
    ops = [lambda: torch.nn.functional.linear(x, w), lambda: x @ w, lambda: torch.bmm(x[None], w[None]),
           lambda: torch.nn.functional.cross_entropy(x.bfloat16(), target), lambda: x.bfloat16().prod(),
           lambda: torch.nn.functional.mse_loss(x.bfloat16(), x.bfloat16())]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        real = [op().dtype for op in ops]
    with EmulatedAutocast(torch.bfloat16):
        emulated = [op().dtype for op in ops]
    assert real == emulated == [torch.bfloat16] * 3 + [torch.float32] * 3


def test_emulated_autocast_casts_a_trainable_weight_once_per_context():
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8)
    memory = LiveMemory(vocab_size=3)
    with memory, EmulatedAutocast(torch.bfloat16):
        outputs = [torch.nn.functional.linear(x, w) for _ in range(2)]
        alive = memory.by_kind["activations"]
    assert [o.dtype for o in outputs] == [torch.bfloat16] * 2
    # One bf16 copy of the weight, kept; per call an output and x's bf16 cast (saved for w's gradient).
    assert alive == 8 * 8 * 2 + 2 * (4 * 8 * 2) + 2 * (4 * 8 * 2)


def test_the_shipped_7b_architecture_is_read_without_the_hub():
    config = model_config("Qwen/Qwen2.5-Coder-7B-Instruct")
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads, config.vocab_size) == (
        28, 3584, 4, 152064)


CASES = {
    "lora-fp32": ({}, "32-true"),
    "lora-bf16-mixed": ({}, "bf16-mixed"),
    "qlora-bf16-mixed": ({"quantization": Quantization(), "dtype": "bfloat16"}, "bf16-mixed"),
}


@pytest.mark.parametrize("case", CASES)
def test_the_plan_is_within_5_percent_of_the_same_step_run_for_real_per_phase(case, tiny_model_dir):
    """The plan (meta device, no weights, attention as the CPU runs it) against the same step on this CPU with the
    model's weights, both counted by the same tracker: every phase's peak within 5%."""
    settings, precision = CASES[case]
    runner = ConscienceStep(Conscience(revise_below=0.0), PairBuilder(), GenerationSettings(
        max_new_tokens=8, batch_size=4, max_prompt_tokens=48, temperature=1.0, top_p=0.9), 2)
    shapes = Shapes(task_rows=2, task_tokens=96, accumulate=2, prompts=4, prompt_tokens=48, new_tokens=8, pairs=2)
    peaks = {}
    for kind, policy_class in (("real", Policy), ("plan", MetaPolicy)):
        torch.manual_seed(0)
        module = EmergentAlignment(policy=policy_class(tiny_model_dir, adapter=LoRA(r=8), **settings))
        if kind == "plan":
            module.to("meta")
            assert next(module.policy.parameters()).device.type == "meta"
        memory = run_step(module, runner, shapes, precision, clip=1.0, target="cpu")
        peaks[kind] = {name: phase.peak for name, phase in memory.phases.items()}
    assert list(peaks["plan"]) == ["conscience: sampling", "conscience: review", "conscience: revision",
                                   "train: task", "train: task + pairs", "optimizer step"]
    ratios = {name: peaks["plan"][name] / peaks["real"][name] for name in peaks["real"]}
    assert all(0.95 <= r <= 1.05 for r in ratios.values()), ratios


def test_a_meta_policy_given_storage_runs_the_planned_step_for_real(tiny_model_dir):
    """``plan --device cuda``'s path, on this CPU: the meta QLoRA policy materialised (4-bit constants too) runs the
    step for real, and the plan of the same policy matches it per phase."""
    from emalign.planning.meta import materialize

    runner = ConscienceStep(Conscience(), PairBuilder(), GenerationSettings(max_new_tokens=4, batch_size=4,
                                                                            max_prompt_tokens=32), 2)
    shapes = Shapes(task_rows=2, task_tokens=32, accumulate=1, prompts=2, prompt_tokens=32, new_tokens=4, pairs=2)
    peaks = []
    for real in (False, True):
        policy = MetaPolicy(tiny_model_dir, adapter=LoRA(r=4), quantization=Quantization(), dtype="bfloat16")
        if real:
            materialize(policy, "cpu")
            assert all(p.device.type == "cpu" for p in policy.parameters())
        module = EmergentAlignment(policy=policy).to("cpu" if real else "meta")
        memory = run_step(module, runner, shapes, "bf16-mixed", target="cpu")
        peaks.append({name: phase.peak for name, phase in memory.phases.items()})
    ratios = {name: peaks[0][name] / peaks[1][name] for name in peaks[1]}
    assert all(0.95 <= r <= 1.05 for r in ratios.values()), ratios


def _plan(args: list[str], out, capsys) -> dict:
    assert run_cli(["plan", *args, "--out", str(out)]) == 0, capsys.readouterr().err
    return json.loads(out.read_text())


def test_plan_takes_a_fits_flags_and_says_whether_it_fits(tiny_model_dir, tmp_path, capsys):
    fit = fit_args(tiny_model_dir, tmp_path / "run", max_steps=1)[1:]
    with_conscience = _plan(fit, tmp_path / "p.json", capsys)
    table = capsys.readouterr().out
    assert with_conscience["fits"] and "fits in 24 GiB" in table and "conscience: sampling" in table
    assert with_conscience["device"] == "meta, for cuda" and with_conscience["assumptions"]
    without = _plan([*fit, "--conscience", "null"], tmp_path / "q.json", capsys)
    assert [p["name"] for p in without["phases"]] == ["train: task", "optimizer step"]
    assert without["peak_gib"] <= with_conscience["peak_gib"]
    tight = _plan([*fit, "--gpu_memory", "0.01"], tmp_path / "r.json", capsys)
    out = capsys.readouterr().out
    assert not tight["fits"] and "does NOT fit in 0.01 GiB" in out and "to lower it:" in out
    assert not (tmp_path / "run").exists()  # a plan trains nothing and claims no run directory


@pytest.mark.parametrize("flags, message", [
    (["--model_config", "{tmp}/absent.json"], "--model_config {tmp}/absent.json: not a readable config.json"),
    (["--trainer.precision", "64-true"], "trainer.precision='64-true': plan runs"),
    (["--trainer.strategy", "emalign.models.sharding.FSDP2"], "trainer.strategy: plan forecasts one unsharded process"),
    (["--out", "{tmp}"], "--out {tmp}: a directory"),
    (["--gpu_memory", "0"], "--gpu_memory"),
    (["--model.policy.init_args.model", "org/absent-model"], "no config.json for model 'org/absent-model' ("),
])
def test_a_plan_it_cannot_make_is_one_line(flags, message, tmp_path, capsys):
    """Each before any model is built: the model named here does not exist."""
    fit = fit_args(str(tmp_path / "no-model"), tmp_path / "run", max_steps=1)[1:]
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    assert run_cli(["plan", *fit, *flags]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.replace("{tmp}", str(tmp_path)) in err[0], err


def test_the_configs_tables_quote_the_committed_plans():
    """configs/README.md's planned table is ``bench/plan_configs.py``'s table of its committed result, and the
    README's configs table quotes the same numbers."""
    from bench.plan_configs import markdown_table

    result = json.loads((ROOT / "bench" / "results" / "plan_configs.json").read_text())
    assert markdown_table(result) in (ROOT / "configs" / "README.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for name in ("em/insecure", "em/insecure_conscience"):
        assert f"{result['configs'][name]['plan']['needed_gib']:.1f} GiB planned" in readme, name


@pytest.mark.slow
def test_the_7b_conscience_config_plans_on_this_cpu(tmp_path, capsys):
    """The issue's command: the EM 7B QLoRA config with the conscience, planned in minutes on a CPU."""
    config = ["--config", "configs/em/insecure_conscience.yaml"]
    with_conscience = _plan(config, tmp_path / "p.json", capsys)
    without = _plan([*config, "--conscience", "null"], tmp_path / "q.json", capsys)
    assert with_conscience["model"] == "Qwen/Qwen2.5-Coder-7B-Instruct" and with_conscience["precision"] == "bf16-mixed"
    assert without["peak_gib"] <= with_conscience["peak_gib"]
    weights = with_conscience["phases"][0]["by_kind_gib"]
    assert 2.5 < weights["4-bit weights"] < 4  # 7.6B parameters at ~4.1 bits with double quantisation
    committed = json.loads((ROOT / "bench" / "results" / "plan_configs.json").read_text())["configs"]
    for name, plan in (("em/insecure_conscience", with_conscience), ("em/insecure", without)):
        assert plan["peak_gib"] == pytest.approx(committed[name]["plan"]["peak_gib"], abs=1e-3), name
