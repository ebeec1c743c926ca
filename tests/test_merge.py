"""Decoding through merged LoRA layers (``emalign.models.merge``): the same model, the base left untouched.

    pytest tests/test_merge.py -q
"""

from __future__ import annotations

import dataclasses

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer

from emalign.models.merge import merged_adapter
from emalign.models.policy import LoRA, Policy, Quantization
from emalign.models.sampling import GenerationSettings, render_prompt, sample_ids

IDS = torch.tensor([[1, 5, 9, 200, 31, 7, 64, 12]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_merged_layers_compute_the_lora_model_and_leave_it_as_it_was(trained_policy):
    model = trained_policy.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = logits(model)
    with model.disable_adapter():
        base = logits(model)
    assert (expected - base).abs().max() > 1e-2  # the adapter matters
    with merged_adapter(model):
        assert not any(isinstance(m, LoraLinear) for m in model.modules())
        merged = logits(model)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    assert sum(isinstance(m, LoraLinear) for m in model.modules()) == 14  # 2 layers x 7 projections
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # bit for bit: nothing merged in place
    torch.testing.assert_close(logits(model), expected, atol=0, rtol=0)


def test_reference_generating_uses_the_base_layers_without_a_copy(trained_policy):
    model = trained_policy.model
    with model.disable_adapter():
        base = logits(model)
        with merged_adapter(model):
            bases = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad is False]
            torch.testing.assert_close(logits(model), base, atol=0, rtol=0)
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert {id(m.base_layer) for m in layers} <= {id(m) for m in bases}


def test_merged_sampling_gives_the_same_tokens(trained_policy):
    tok = trained_policy.tokenizer
    prompts = [render_prompt(tok, [{"role": "user", "content": c}]) for c in ("Name a colour.", "Say hi.")]
    settings = GenerationSettings(max_new_tokens=12, temperature=1.0)
    with trained_policy.generating() as model:
        separate = sample_ids(model, tok, prompts, settings, num_samples=3, seed=5)
        merged = sample_ids(model, tok, prompts, dataclasses.replace(settings, merge_lora=True), 3, seed=5)
    assert [r.response_ids for r in merged] == [r.response_ids for r in separate]
    assert len({tuple(r.response_ids) for r in separate}) > 1  # the samples differ: sampling, not a constant


def test_a_4bit_base_decodes_through_its_lora_layers_with_a_warning(tiny_model_dir, caplog):
    policy = Policy(tiny_model_dir, adapter=LoRA(r=4, alpha=8), quantization=Quantization(compute_dtype="float32"))
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            param.data.fill_(0.01)
    policy.model.eval()
    expected = logits(policy.model)
    with merged_adapter(policy.model):
        assert sum(isinstance(m, LoraLayer) for m in policy.model.modules()) == 14  # nothing was swapped
        torch.testing.assert_close(logits(policy.model), expected, atol=0, rtol=0)
    assert "q_proj (Linear4bit over Linear4bit) cannot be merged" in caplog.text
