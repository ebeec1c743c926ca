"""FSDP on CPU processes over gloo (``emalign.models.sharding.FSDP2``), with the conscience inside.

The sharded fits of the tiny model with LoRA: two "nodes" of one process each (torchrun, the
``two_node_fsdp_run`` fixture), and its resume from step 2 on one node of two processes
(Lightning's own launcher). The conscience samples, reviews and revises every 2 steps on sharded
weights, the evaluation callback runs at the start and end, and a probe checks on each rank that
the reference (the adapter disabled) is the base model. The losses are compared with the same fit
under DDP and in one process.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from fit_probes import FSDP_CPU, LOSS_TOLERANCE, STEPS, cli, fit_config, free_port, mean_losses, rows, torchrun

from conftest import ROOT, run_cli

multiprocess = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def resumed_run(two_node_fsdp_run, tiny_model_dir, tmp_path_factory) -> Path:
    """The 2-node fit resumed from its step-2 checkpoint on one node of two processes."""
    run = tmp_path_factory.mktemp("resumed") / "run"
    (step2,) = (two_node_fsdp_run / "checkpoints").glob("*step=2.ckpt")
    config = fit_config(tiny_model_dir, run, processes=2, evaluation=True)
    done = cli("fit", "--config", str(config), "--config", FSDP_CPU, "--ckpt_path", str(step2))
    assert done.returncode == 0, done.stderr[-3000:]
    return run


@multiprocess
def test_fsdp_reference_is_the_base_model_not_the_policy(two_node_fsdp_run, resumed_run):
    for run in (two_node_fsdp_run, resumed_run):
        probes = [rows(run, "reference", rank)[0] for rank in (0, 1)]
        for probe in probes:
            assert probe["strategy"] == "FSDP2" and probe["sharded"]
            assert probe["ref_vs_base"] < 1e-5, probe  # the disabled adapter reads exactly the base weights
            assert probe["policy_vs_base"] > 1e-3, probe  # while the adapted policy has moved away from them
        # One policy on both ranks (without a gradient all-reduce the ranks would drift apart: 0.80 vs 0.77).
        assert abs(probes[0]["policy_vs_base"] - probes[1]["policy_vs_base"]) < 1e-6, probes


@multiprocess
def test_fsdp_conscience_revision_and_eval_ran_on_sharded_weights(two_node_fsdp_run, resumed_run):
    for run, steps in ((two_node_fsdp_run, [0, 2]), (resumed_run, [2])):
        rollouts = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
        assert sorted({r["step"] for r in rollouts}) == steps and all(isinstance(r["score"], float) for r in rollouts)
        for rank in (0, 1):  # every rank revised its best answers (all score below revise_below: 100)
            assert [(r["step"], r["answers"]) for r in rows(run, "revisions", rank)] == [(s, 2) for s in steps]
        checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
        assert checkpoint["global_step"] == STEPS and checkpoint["pair_queue"]["pairs"]
        assert all("lora_" in k for k in checkpoint["state_dict"])  # gathered on rank 0, trainable weights only
        history = [json.loads(line) for line in (run / "eval_history.jsonl").read_text().splitlines()]
        assert [h["step"] for h in history] == [steps[0], STEPS] and all(h["n"] for h in history)
        assert (run / "adapter" / "adapter_model.safetensors").is_file()


@multiprocess
def test_fsdp_losses_match_ddp_and_single_process(two_node_fsdp_run, single_process_run, tiny_model_dir, tmp_path):
    ddp = tmp_path / "ddp"  # one node, two processes
    torchrun(fit_config(tiny_model_dir, ddp, processes=2), ddp, "--trainer.strategy", "ddp", nodes=1, per_node=2)
    fsdp, ddp_losses = mean_losses(two_node_fsdp_run, 2), mean_losses(ddp, 2)
    single = mean_losses(single_process_run, 1)
    assert len(fsdp) == len(ddp_losses) == len(single) == STEPS
    assert max(single) - min(single) > 10 * LOSS_TOLERANCE  # real updates, not a flat line that trivially agrees
    assert max(abs(a - b) for a, b in zip(fsdp, single)) < LOSS_TOLERANCE, (fsdp, single)
    assert max(abs(a - b) for a, b in zip(fsdp, ddp_losses)) < LOSS_TOLERANCE, (fsdp, ddp_losses)
    for run, ranks in ((ddp, (0, 1)), (single_process_run, (0,))):
        for rank in ranks:
            (probe,) = rows(run, "reference", rank)
            assert probe["ref_vs_base"] < 1e-5 and probe["policy_vs_base"] > 1e-3 and not probe["sharded"], probe
            assert [r["step"] for r in rows(run, "revisions", rank)] == [0, 2]


@multiprocess
def test_fsdp_resume_retraces_the_uninterrupted_fit(two_node_fsdp_run, resumed_run):
    # Two nodes of one process, then one node of two: the same two ranks, the same data, the same losses.
    for rank in (0, 1):
        before = {r["step"]: r["loss"] for r in rows(two_node_fsdp_run, "losses", rank)}
        after = {r["step"]: r["loss"] for r in rows(resumed_run, "losses", rank)}
        assert sorted(after) == [2, 3]
        assert all(abs(after[s] - before[s]) < 1e-6 for s in after), (before, after)
    checkpoint = torch.load(resumed_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == STEPS
    assert int(next(iter(checkpoint["optimizer_states"][0]["state"].values()))["step"]) == STEPS


def test_full_fine_tune_shards_on_one_rank_and_keeps_generation_review_and_frozen_copy(tiny_model_dir, tmp_path,
                                                                                        monkeypatch):
    # One process, a one-rank mesh: no cross-rank traffic, but the same units, root, hooks and gather.
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    from emalign.conscience.verdict import Conscience
    from emalign.models.logprobs import mean_token_nll
    from emalign.models.policy import Policy
    from emalign.models.sampling import GenerationSettings, render_prompt, sample_ids
    from emalign.models.sharding import is_sharded, shard_policy

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        policy = Policy(tiny_model_dir, adapter=None, reference="copy")
        tokenizer, settings = policy.tokenizer, GenerationSettings(max_new_tokens=5, temperature=0.0)
        prompt = render_prompt(tokenizer, [{"role": "user", "content": "Give me code number 1."}])

        def generate_and_review():
            with policy.generating() as model:
                (rollout,) = sample_ids(model, tokenizer, [prompt], settings)
            with policy.as_reference() as reference:
                return rollout.response_ids, Conscience().review(reference, tokenizer, [prompt], [rollout.response_ids])

        response, review = generate_and_review()
        original = policy.model.get_output_embeddings().weight.detach().clone()
        shard_policy(policy, init_device_mesh("cpu", (1,)))
        assert is_sharded(policy.model) and is_sharded(policy._reference_copy)
        sharded_response, sharded_review = generate_and_review()
        assert sharded_response == response
        assert torch.allclose(sharded_review.scores, review.scores, atol=1e-5)
        assert torch.allclose(sharded_review.ref_logps, review.ref_logps, atol=1e-4)
        ids = torch.tensor([prompt + response])
        mean_token_nll(policy.model, ids, torch.ones_like(ids), ids).backward()
        with torch.no_grad():
            for p in policy.model.parameters():
                p -= 0.1 * p.grad
        frozen = generate_and_review()[1]
        assert torch.allclose(frozen.scores, review.scores, atol=1e-5)  # the frozen copy did not train
        policy.save_pretrained(tmp_path / "full")  # gathered from the shards
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / "full").get_output_embeddings().weight
        trained = policy.model.get_output_embeddings().weight.full_tensor()
        assert torch.equal(saved, trained) and not torch.equal(trained, original)
    finally:
        torch.distributed.destroy_process_group()


def test_pair_loss_gradients_are_the_same_sharded_on_one_rank(tiny_model_dir, monkeypatch):
    # The pair forward of a training step (chosen and rejected in one batch, checkpointed layers) under LoRA: in the
    # multi-process fits it runs at align_weight 0, so here its gradients are compared with the unsharded model's.
    from torch.distributed.device_mesh import init_device_mesh

    from emalign.models.logprobs import pad_right, response_mask, sequence_logps
    from emalign.models.policy import LoRA, Policy
    from emalign.models.sharding import shard_policy

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        policy = Policy(tiny_model_dir, adapter=LoRA(r=4, alpha=8))
        prompt, chosen, rejected = [1, 5, 9, 13], [21, 22, 23], [31, 32]
        ids, mask = pad_right([prompt + chosen, prompt + rejected], policy.tokenizer.pad_token_id)
        target = response_mask([len(prompt)] * 2, [len(chosen), len(rejected)], ids.shape[1])

        def gradients() -> dict[str, torch.Tensor]:
            policy.model.zero_grad(set_to_none=True)
            with policy.checkpointed():
                logps = sequence_logps(policy.model, ids, mask, target)
            torch.nn.functional.logsigmoid(0.1 * (logps[0] - logps[1])).backward()
            return {name: getattr(p.grad, "full_tensor", lambda: p.grad)() for name, p in
                    policy.model.named_parameters() if p.requires_grad}

        plain = gradients()
        shard_policy(policy, init_device_mesh("cpu", (1,)))
        sharded = gradients()
        assert sharded.keys() == plain.keys() and any(g.abs().max() > 0 for g in plain.values())
        assert all(torch.allclose(sharded[k], plain[k], atol=1e-6) for k in plain)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("override, reason", [
    (["--model.policy.init_args.quantization", "{}"], "QLoRA"),
    (["--trainer.strategy", "fsdp"], "FSDP1"),
    (["--trainer.callbacks+=emalign.callbacks.AlignmentEvalCallback",
      "--trainer.callbacks.settings.judge=emalign.judges.openai_judge.OpenAIJudge"], "external judge"),
    (["--conscience.conscience.include_reasoning=false"], "include_reasoning"),
])
def test_unsupported_fsdp_combinations_fail_in_one_line_before_weights_load(override, reason, tmp_path, capsys):
    # The model does not exist: an error about it would mean the check came after loading began.
    strategy = ["--trainer.accelerator", "cpu"] if reason == "FSDP1" else ["--config", FSDP_CPU]
    args = ["fit", "--config", str(ROOT / "configs" / "demo.yaml"), *strategy, "--model.policy.init_args.model",
            str(tmp_path / "absent-model"), "--trainer.default_root_dir", str(tmp_path)]
    assert run_cli(args + override) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "FSDP" in errors[0] and reason in errors[0] and "Traceback" not in err, err


def test_readme_strategy_table_names_only_tests_that_exist():
    text = (ROOT / "docs" / "distributed.md").read_text(encoding="utf-8")
    table = text[text.index("## Strategies × features"):]
    cells = [line.split("|")[2:-1] for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(cells) > 5 and all(len(row) == 4 and all(c.strip() for c in row) for row in cells), cells
    named = re.findall(r"\b(test_\w+)::(test_\w+)", table)
    assert len(named) > 10
    for module, test in named:
        source = (ROOT / "tests" / f"{module}.py").read_text(encoding="utf-8")
        assert f"def {test}(" in source, f"README names {module}::{test}, which does not exist"
