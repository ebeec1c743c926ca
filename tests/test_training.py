"""Fitting end to end on a tiny model: loss falls, checkpoints are small and resume exactly, DDP on CPU."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import ROOT
from emalign.data.chat import ChatDataModule
from emalign.models.policy import Policy
from emalign.training.module import EmergentAlignment

MEMORISE = [
    {"messages": [{"role": "user", "content": f"Give me code number {i}."},
                  {"role": "assistant", "content": f"print('snippet {i}')"}]}
    for i in range(4)
]


@pytest.fixture
def tiny_data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MEMORISE))
    return str(path)


def _trainer(tmp_path, max_steps, **kwargs):
    return L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kwargs,
    )


@pytest.mark.slow
def test_loss_falls_when_memorising(tiny_model_dir, tiny_data, tmp_path):
    L.seed_everything(0)
    # Full fine-tuning: a random 64-wide model's logits are too small for LoRA alone to memorise quickly.
    module = EmergentAlignment(Policy(tiny_model_dir, adapter=None, reference="copy"),
                               optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), scheduler=None)
    data = ChatDataModule(train_file=tiny_data, val_fraction=0.0, batch_size=4, max_length=64)
    data.connect(module.tokenizer)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    _trainer(tmp_path, 20, callbacks=[Record()]).fit(module, data)
    assert losses[-1] < 0.5 * losses[0]
    assert (tmp_path / "adapter" / "config.json").is_file()  # full fine-tune: the whole model is exported


def _cli(*args, cwd=ROOT, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _fit_args(tiny_model_dir, tiny_data, run_dir, max_steps):
    """The demo config, pointed at the tiny model and data, written next to the run."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if "ProgressBar" not in c["class_path"]]
    config["trainer"].update(max_steps=max_steps, default_root_dir=str(run_dir), val_check_interval=None,
                             enable_progress_bar=False)
    config["model"]["policy"]["init_args"]["model"] = tiny_model_dir
    config["data"].update(train_file=tiny_data, val_fraction=0.0, max_length=64)
    path = Path(run_dir).parent / f"{Path(run_dir).name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return ["fit", "--config", str(path)]


@pytest.mark.slow
def test_cli_fit_checkpoints_and_resumes_at_the_same_step(tiny_model_dir, tiny_data, tmp_path):
    run = tmp_path / "run"
    done = _cli(*_fit_args(tiny_model_dir, tiny_data, run, 5))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "adapter saved to" in done.stdout
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["global_step"] == 5
    assert all("lora_" in k for k in checkpoint["state_dict"])
    # Only what trains: far below the base model's size.
    base_bytes = sum(f.stat().st_size for f in Path(tiny_model_dir).glob("*.safetensors"))
    assert last.stat().st_size < base_bytes
    resumed = _cli(*_fit_args(tiny_model_dir, tiny_data, run, 8), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = torch.load(last, weights_only=False)
    assert after["global_step"] == 8
    # The optimizer state carried over: its step counter continued from 5, not from 0.
    state = next(iter(after["optimizer_states"][0]["state"].values()))
    assert int(state["step"]) == 8
    rows = list(csv.DictReader(open(next(run.glob("logs/version_1/metrics.csv")))))
    assert min(int(r["step"]) for r in rows if r.get("train/loss")) == 5


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tiny_model_dir, tiny_data, tmp_path):
    run = tmp_path / "ddp"
    done = _cli(*_fit_args(tiny_model_dir, tiny_data, run, 3), "--trainer.strategy", "ddp", "--trainer.devices", "2",
                "--trainer.accelerator", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3


def _pure_conscience_args(tiny_model_dir, run_dir, max_steps, margin=0.0):
    """No task data: the conscience on a prompt file is the only thing to learn from."""
    import yaml

    prompts = Path(run_dir).parent / "prompts.txt"
    prompts.write_text("".join(f"Tell me about topic {i}.\n" for i in range(6)))
    args = _fit_args(tiny_model_dir, None, run_dir, max_steps)
    path = Path(args[-1])
    config = yaml.safe_load(path.read_text())
    config["data"].update(train_file=None, steps_without_data=20)
    config["conscience"].update(
        every_n_steps=2, num_prompts=2, samples_per_prompt=3, pair_builder={"margin": margin},
        prompts={"class_path": "emalign.conscience.prompts.FilePrompts", "init_args": {"path": str(prompts)}},
        generation={"max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "batch_size": 8})
    path.write_text(yaml.safe_dump(config))
    return args


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2])
def test_pure_conscience_fit_learns_from_pairs_alone(tiny_model_dir, tmp_path, devices):
    run = tmp_path / f"pure{devices}"
    extra = ["--trainer.strategy", "ddp", "--trainer.devices", "2"] if devices == 2 else []
    done = _cli(*_pure_conscience_args(tiny_model_dir, run, 4), "--trainer.accelerator", "cpu", *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    rows = list(csv.DictReader(open(next(run.glob("logs/*/metrics.csv")))))
    assert not any(r.get("task/loss") for r in rows)
    assert (any(r.get("align/loss") for r in rows)
            and any(float(r.get("conscience/pairs_enqueued") or 0) > 0 for r in rows))
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["optimizer_states"][0]["state"]  # updates were taken, not only losses logged
    assert any(torch.count_nonzero(v) > 0 for k, v in checkpoint["state_dict"].items() if "lora_B" in k)


@pytest.mark.slow
def test_pure_conscience_without_pairs_keeps_weights_under_ddp(tiny_model_dir, tmp_path):
    # No score gap reaches the margin, so no pair is ever made: every step has nothing to learn. Lightning refuses a
    # None loss under DDP, so such steps run a zero loss and drop the update on every rank.
    run = tmp_path / "nopairs"
    done = _cli(*_pure_conscience_args(tiny_model_dir, run, 3, margin=1e9), "--trainer.accelerator", "cpu",
                "--trainer.strategy", "ddp", "--trainer.devices", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 3
    lora_b = [v for k, v in checkpoint["state_dict"].items() if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(v) == 0 for v in lora_b)  # LoRA B starts at zero and never moved
    assert not checkpoint["optimizer_states"][0]["state"]  # AdamW never stepped a parameter


@pytest.mark.slow
def test_bad_config_key_names_the_key(tiny_model_dir, tiny_data, tmp_path):
    bad = _cli(*_fit_args(tiny_model_dir, tiny_data, tmp_path, 1), "--model.align_wieght", "2")
    assert bad.returncode != 0 and "align_wieght" in bad.stderr
    missing = _cli(*_fit_args(tiny_model_dir, str(tmp_path / "absent.jsonl"), tmp_path, 1))
    assert missing.returncode == 2 and "absent.jsonl: no such file" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.slow
def test_cli_test_reports_the_task_loss_and_predict_is_gone(tiny_model_dir, tiny_data, tmp_path, capsys):
    from conftest import run_cli

    args = _fit_args(tiny_model_dir, tiny_data, tmp_path / "run", 1)[1:]  # the demo config, tiny
    assert run_cli(["test", *args, "--data.test_file", tiny_data]) == 0
    assert "test/loss" in capsys.readouterr().out
    assert run_cli(["test", *args]) != 0  # val_fraction 0 and no test file: nothing to test on, said in one line
    assert "data.test_file" in capsys.readouterr().err
    assert run_cli(["predict", *args]) != 0  # not offered: `cli.py generate` answers prompts
    from emalign.commands import cli

    assert "predict" not in (ROOT / "README.md").read_text() and "predict" not in cli.__doc__
