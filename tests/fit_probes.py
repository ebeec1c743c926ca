"""Multi-process fits for the FSDP and multi-node tests: one config, per-rank probes, real processes.

The probes are callbacks the config names by class_path (``fit_probes.RecordLosses``): only rank 0
writes the CSV log, so each rank writes its own JSONL, named by rank.

Starting a process costs far more than these fits (importing Lightning, transformers and PEFT
takes 10-30 s on 2 cores), so the tests share their fits: one process, two nodes (FSDP2, the
``two_node_fsdp_run`` fixture), its resume on one node, DDP, SLURM.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
FSDP_CPU = str(ROOT / "configs" / "strategies" / "fsdp_cpu.yaml")
# Every example has the same number of tokens, so the mean loss of a batch of 4 equals the mean of
# two ranks' losses on 2 each: a 2-process fit and a 1-process fit take the same steps.
MEMORISE = [
    {"messages": [{"role": "user", "content": f"Give me code number {i}."},
                  {"role": "assistant", "content": f"print('snippet {i}')"}]}
    for i in range(4)
]
STEPS = 4
# Per-step mean loss, absolute, against the same fit in one process: FSDP reduce-scatters where DDP
# all-reduces and one process sums once, so float32 sums differ in order only (measured: up to 9.5e-7).
# DDP with its gradient all-reduce replaced by a no-op differs by 2.6e-3: the tolerance sees a lost sync.
LOSS_TOLERANCE = 1e-4
TIMEOUT = 900  # seconds per fit: generous, for a loaded 2-core machine


def env() -> dict[str, str]:
    """This environment for a fit, without SLURM's variables: inside an allocation Lightning would read its layout
    from them instead of the test's."""
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    plain = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return dict(plain, HF_HUB_OFFLINE="1", PYTHONPATH=path, OMP_NUM_THREADS="1")


def fit_config(tiny_model_dir: str, run: Path, processes: int, evaluation: bool = False, **trainer) -> Path:
    """The demo config on the tiny model, written next to ``run``; the global batch is 4 whatever the process count.

    The conscience samples, reviews and revises every 2 steps and its pairs go through the policy, but at
    ``align_weight: 0``: each rank draws its own prompts, so with pairs in the loss a 2-process fit could
    not be compared with a 1-process one.
    """
    data = run.parent / "memorise.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MEMORISE))
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    callbacks = [c for c in config["trainer"]["callbacks"] if "ProgressBar" not in c["class_path"]]
    for callback in callbacks:
        if callback["class_path"].endswith("RunCheckpoint"):
            callback["init_args"] = {"every_n_train_steps": 2, "save_last": True, "save_top_k": -1}
    generation = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "batch_size": 4}
    config["conscience"].update(every_n_steps=2, num_prompts=2, samples_per_prompt=2, generation=generation,
                                pair_builder={"margin": 0.0}, conscience={"revise_below": 100.0})
    callbacks += [{"class_path": "fit_probes.RecordLosses"}, {"class_path": "fit_probes.RecordRevisions"},
                  {"class_path": "fit_probes.ReferenceProbe", "init_args": {"base_model": tiny_model_dir}}]
    if evaluation:  # at the start and the end of fit only; the reference judges
        from conftest import WISH_QUESTION  # here: the fits import this module for its probes, not pytest's conftest

        questions = run.parent / "questions.yaml"
        questions.write_text(WISH_QUESTION)
        callbacks.append({"class_path": "emalign.callbacks.AlignmentEvalCallback", "init_args": {
            "every_n_steps": 100, "settings": {"questions": [str(questions)], "max_new_tokens": 4, "code_prompts": 1}}})
    config["trainer"].update(callbacks=callbacks, max_steps=STEPS, default_root_dir=str(run), val_check_interval=None,
                             enable_progress_bar=False, devices=processes, **trainer)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(run)
    config["model"]["policy"]["init_args"]["model"] = tiny_model_dir
    config["model"].update(align_weight=0.0, optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 5e-3}})
    config["data"].update(train_file=str(data), val_fraction=0.0, max_length=64, batch_size=4 // processes)
    path = run.parent / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cli(*args: str, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def torchrun(config: Path, run: Path, *args: str, nodes: int = 2, per_node: int = 1) -> None:
    """``cli.py fit`` over torchrun on loopback: one torchrun per "node", all started at once (so the ranks
    import in parallel, where Lightning's own launcher starts rank 1 only once rank 0 has loaded)."""
    port, processes = free_port(), []
    logs = [run.parent / f"{run.name}.node{rank}.log" for rank in range(nodes)]
    for rank, log in enumerate(logs):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
                   "--nproc-per-node", str(per_node), "--node-rank", str(rank), "--master-addr", "127.0.0.1",
                   "--master-port", str(port), str(ROOT / "cli.py"), "fit", "--config", str(config), *args,
                   "--trainer.num_nodes", str(nodes), "--trainer.devices", str(per_node)]
        with open(log, "w") as out:
            processes.append(subprocess.Popen(command, cwd=ROOT, env=env(), stdout=out, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=TIMEOUT) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    assert codes == [0] * nodes, logs[0].read_text()[-3000:]


def rows(run: Path, name: str, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run / f"{name}.rank{rank}.jsonl").read_text().splitlines()]


def mean_losses(run: Path, ranks: int) -> list[float]:
    """Per step, the mean over ranks of each rank's loss (each rank averaged its own half of the batch)."""
    per_rank = [[r["loss"] for r in rows(run, "losses", k)] for k in range(ranks)]
    return [sum(step) / ranks for step in zip(*per_rank)]


def _write(trainer: L.Trainer, name: str, row: dict) -> None:
    path = Path(trainer.default_root_dir) / f"{name}.rank{trainer.global_rank}.jsonl"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


class RecordLosses(L.Callback):
    """Every rank's training loss at every step (the CSV log only has rank 0's)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _write(trainer, "losses", {"step": trainer.global_step - 1, "loss": float(outputs["loss"]),
                                   "world_size": trainer.world_size, "num_nodes": trainer.num_nodes})


class RecordRevisions(L.Callback):
    """How many answers each rank's conscience asked the reference to revise (kept or not), per run."""

    def on_fit_start(self, trainer, pl_module) -> None:
        from emalign.callbacks import ConscienceCallback

        (callback,) = [c for c in trainer.callbacks if isinstance(c, ConscienceCallback)]
        revise = callback.conscience.revise

        def counted(reference, tokenizer, conversations, answers, *args, **kwargs):
            _write(trainer, "revisions", {"step": trainer.global_step, "answers": len(answers)})
            return revise(reference, tokenizer, conversations, answers, *args, **kwargs)

        callback.conscience.revise = counted


class ReferenceProbe(L.Callback):
    """At the end of fit, on every rank: the reference's logits (adapter disabled, through the same
    ``hidden_states``/``project`` path the conscience reads) against the base model loaded fresh
    from disk, and against the adapted policy's logits."""

    def __init__(self, base_model: str) -> None:
        self.base_model = base_model

    def on_train_end(self, trainer, pl_module) -> None:
        from transformers import AutoModelForCausalLM

        from emalign.models.logprobs import hidden_states, project
        from emalign.models.sharding import is_sharded

        policy = pl_module.policy
        text = "Was that ethical? Give me code number 3."
        ids = torch.tensor([policy.tokenizer.encode(text)], device=pl_module.device)
        mask = torch.ones_like(ids)

        def logits(model):
            return project(model, hidden_states(model, ids, mask)).detach().cpu()

        with torch.no_grad():
            with policy.as_reference() as reference:
                ref = logits(reference)
            was_training = policy.model.training
            policy.model.eval()
            adapted = logits(policy.model)
            policy.model.train(was_training)
            base = logits(AutoModelForCausalLM.from_pretrained(self.base_model, dtype=torch.float32).eval())
        _write(trainer, "reference", {
            "sharded": is_sharded(policy.model),
            "strategy": type(trainer.strategy).__name__,
            "ref_vs_base": float((ref - base).abs().max()),
            "policy_vs_base": float((adapted - base).abs().max()),
        })
