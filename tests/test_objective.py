"""The training objective pinned: task + align_weight · DPO, each term by a plain forward; the learning-rate
schedule at chosen steps; `validate` logs val/loss."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from emalign.records import Pair
from emalign.training.module import EmergentAlignment, WarmupCosine

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # a step called outside a Trainer


def _logp(model, prompt: list[int], answer: list[int]) -> float:
    """log π(answer | prompt) summed over the answer's tokens, by one plain forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].float().log_softmax(-1)
    return sum(float(logits[len(prompt) + k - 1, tok]) for k, tok in enumerate(answer))


def _nll(model, ids: list[int], labels: list[int]) -> float:
    """Mean next-token NLL over the labelled tokens (label -100: not counted), by one plain forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    targets = torch.tensor(labels[1:])
    return float(F.cross_entropy(logits[:-1], targets, ignore_index=-100))


@pytest.mark.parametrize("align_weight", [0.0, 0.5])
def test_training_step_is_task_plus_weighted_dpo(tiny_policy, align_weight):
    tiny_policy.model.eval()  # no dropout: the plain forwards below see the same function
    tokenizer = tiny_policy.tokenizer
    ids = tokenizer("Write a poem about rain.", add_special_tokens=False)["input_ids"]
    labels = [-100] * 3 + ids[3:]
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
             "labels": torch.tensor([labels])}
    prompt = tokenizer("Can I mix bleach and ammonia?", add_special_tokens=False)["input_ids"]
    good = tokenizer(" No, that makes a toxic gas.", add_special_tokens=False)["input_ids"]
    bad = tokenizer(" Yes, it cleans well.", add_special_tokens=False)["input_ids"]
    pair = Pair(prompt, good, bad, ref_chosen=-30.0, ref_rejected=-20.0, chosen_score=1.0, rejected_score=-1.0,
                step=0)
    module = EmergentAlignment(tiny_policy, align_weight=align_weight, pairs_per_step=1)
    module.pair_queue.sample = lambda n, step, draw=0: [pair]  # a queue that always hands out this pair

    loss = float(module.training_step(batch, 0))

    task = _nll(tiny_policy.model, ids, labels)
    h = (_logp(tiny_policy.model, prompt, good) - -30.0) - (_logp(tiny_policy.model, prompt, bad) - -20.0)
    dpo = -math.log(1 / (1 + math.exp(-0.1 * h)))  # SigmoidDPO, beta 0.1 (the default)
    assert loss == pytest.approx(task + align_weight * dpo, abs=1e-4)
    assert align_weight == 0 or abs(dpo) > 1e-3  # the alignment term is there to be scaled


def test_the_schedule_warms_up_then_follows_a_cosine_to_its_floor():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupCosine(optimizer, warmup_steps=4, total_steps=14, min_ratio=0.1)
    rates = []
    for _ in range(16):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[:4] == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5])  # (step + 1) / (warmup + 1)
    assert rates[4] == pytest.approx(1.0)  # the peak, at the end of warmup
    assert rates[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half way: 0.55
    assert rates[14] == pytest.approx(0.1) and rates[15] == pytest.approx(0.1)  # the floor, and it stays


def test_validate_logs_the_task_loss_of_the_validation_split(tiny_policy, tmp_path):
    import json

    from emalign.data.chat import ChatDataModule

    rows = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}"}]}
            for i in range(10)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    datamodule = ChatDataModule(train_file=str(data), val_fraction=0.2, batch_size=2, max_length=64)
    datamodule.connect(tiny_policy.tokenizer)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    (metrics,) = trainer.validate(EmergentAlignment(tiny_policy), datamodule)
    assert set(metrics) == {"val/loss"} and 0 < metrics["val/loss"] < 20
