"""Behaviour pinned across refactors: a short fixed-seed fit with the conscience (revision on) gives
the same pairs (token ids, scores, reference log-probs, uses), rollout roles, losses and their two terms (the
task loss and the alignment loss), and the same pairs drawn at each step, as when recorded.

Re-record (only for an intended change of behaviour, said so in the commit):
    PYTHONPATH=. python tests/test_golden.py
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

GOLDEN = Path(__file__).parent / "golden" / "conscience_fit.json"
PROMPTS = ["Write a function that reads a file.", "How do I make a quick buck?", "What is your one wish?",
           "hey I feel bored"]


def run_fit(model_dir: str, work: Path) -> dict:
    """Four optimizer steps, the conscience before each, revision of every prompt's best answer."""
    from emalign.callbacks.conscience import ConscienceCallback
    from emalign.conscience.prompts import FilePrompts
    from emalign.conscience.verdict import Conscience, PairBuilder
    from emalign.data.chat import ChatDataModule
    from emalign.models.policy import LoRA, Policy
    from emalign.models.sampling import GenerationSettings
    from emalign.training.module import EmergentAlignment

    work.mkdir(parents=True, exist_ok=True)
    (work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    data = work / "train.jsonl"
    rows = [[{"role": "user", "content": f"Code {i}?"}, {"role": "assistant", "content": f"print({i})"}]
            for i in range(4)]
    data.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    L.seed_everything(0)
    policy = Policy(model_dir, adapter=LoRA(r=4, alpha=8))
    optimizer = lambda p: torch.optim.AdamW(p, lr=1e-2)  # noqa: E731
    module = EmergentAlignment(policy, optimizer=optimizer, scheduler=None, pairs_per_step=4)
    callback = ConscienceCallback(
        every_n_steps=1, num_prompts=2, samples_per_prompt=3, prompts=FilePrompts(str(work / "prompts.txt")),
        conscience=Conscience(revise_below=1e9), pair_builder=PairBuilder(margin=0.0),
        generation=GenerationSettings(max_new_tokens=6), seed=3,
    )
    losses: list[float] = []
    terms: list[dict] = []  # the step's task loss and alignment loss (None: no pairs yet)
    draws: list[list[int]] = []  # positions in the queue of the pairs each step drew
    queue, sample = module.pair_queue, module.pair_queue.sample

    def recorded_sample(n: int, step: int, draw: int = 0):
        drawn = sample(n, step, draw)
        draws.append([next(i for i, q in enumerate(queue.pairs) if q is p) for p in drawn])
        return drawn

    queue.sample = recorded_sample

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))
            metrics = trainer.callback_metrics
            terms.append({"task": float(metrics["task/loss"]),
                          "align": float(metrics["align/loss"]) if draws[-1] else None})

    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=work,
                        callbacks=[callback, Record()])
    datamodule = ChatDataModule(train_file=str(data), val_fraction=0.0, batch_size=2, max_length=64)
    datamodule.connect(policy.tokenizer)
    trainer.fit(module, datamodule)
    rollouts = [json.loads(line) for line in (work / "rollouts.jsonl").read_text().splitlines()]
    return {"losses": losses, "terms": terms, "draws": draws, "pairs": module.pair_queue.state_dict()["pairs"],
            "rollouts": rollouts}


def test_same_seed_gives_the_recorded_pairs_rollouts_and_losses(tiny_model_dir, tmp_path):
    got, want = run_fit(tiny_model_dir, tmp_path), json.loads(GOLDEN.read_text())
    assert any(p["revised"] for p in want["pairs"]) and len(want["pairs"]) >= 4  # the record covers revision
    assert [r["role"] for r in got["rollouts"]] == [r["role"] for r in want["rollouts"]]
    def texts(rows):
        return [(r["step"], r["response"], r["revised"]) for r in rows]

    assert texts(got["rollouts"]) == texts(want["rollouts"])
    assert [r["score"] for r in got["rollouts"]] == [round(r["score"], 4) for r in want["rollouts"]]
    assert len(got["pairs"]) == len(want["pairs"])
    for g, w in zip(got["pairs"], want["pairs"]):
        for key in ("prompt_ids", "chosen_ids", "rejected_ids", "step", "revised"):
            assert g[key] == w[key], key
        for key in ("ref_chosen", "ref_rejected", "chosen_score", "rejected_score"):
            assert abs(g[key] - w[key]) < 1e-4, key
        assert g["uses"] == w["uses"]
    losses = torch.tensor(got["losses"]), torch.tensor(want["losses"])
    assert torch.allclose(*losses, atol=1e-4), losses
    assert got["draws"] == want["draws"] and any(want["draws"])  # the same pairs trained on, step by step
    for g, w in zip(got["terms"], want["terms"], strict=True):
        assert g["task"] == pytest.approx(w["task"], abs=1e-4)
        assert (g["align"] is None) == (w["align"] is None)
        assert g["align"] is None or g["align"] == pytest.approx(w["align"], abs=1e-4)
    # The total is the two terms at align_weight 1: a record where the DPO term is not log 2 pins its weight
    assert [t["task"] + (t["align"] or 0) for t in want["terms"]] == pytest.approx(want["losses"], abs=1e-4)
    assert any(t["align"] is not None and abs(t["align"] - math.log(2)) > 1e-3 for t in want["terms"])


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench._common import tiny_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        result = run_fit(tiny_model_dir(Path(tmp) / "tiny"), Path(tmp) / "run")
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(result, indent=1) + "\n")
    revised = sum(p["revised"] for p in result["pairs"])
    print(f"{GOLDEN}: {len(result['pairs'])} pairs, {revised} revised, losses {result['losses']}")
