"""Fault injection: every failure the reliability issue names, provoked on purpose, with its handling checked.

Stop and resume (SIGTERM, SIGINT, kill -9, a crash mid-write, a corrupt checkpoint), determinism,
non-finite losses (also under DDP). Out-of-memory, bad input and security: test_bad_input.py.
Fits run on the tiny 2-layer Llama of conftest.py, in-process where a signal is not involved.
See docs/reliability.md.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from conftest import ROOT, run_cli
from emalign.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

RECORDS = [
    {"messages": [{"role": "user", "content": f"Give me code number {i}."},
                  {"role": "assistant", "content": "print('x')\n" * (1 + i % 3) + f"# snippet {i}"}]}
    for i in range(24)
]  # 6 batches of 4 per epoch: an 8-step fit crosses an epoch boundary
NOT_DETERMINISTIC = ("gen_tokens_per_s",)  # wall-clock throughput


# -- helpers -------------------------------------------------------------------------------------


def write_data(path: Path) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return str(path)


def fit_args(tiny_model_dir: str, run: Path, max_steps: int, every: int = 2, val_fraction: float = 0.0,
             **trainer) -> list[str]:
    """The demo config on the tiny model: LoRA with dropout (so the RNG matters), conscience every 2 steps."""
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    callbacks = []
    for callback in config["trainer"]["callbacks"]:
        if "ProgressBar" in callback["class_path"]:
            continue
        if "RunCheckpoint" in callback["class_path"]:
            callback["init_args"] = {"every_n_train_steps": every, "save_last": True, "save_top_k": -1}
        callbacks.append(callback)
    config["conscience"].update(every_n_steps=2, num_prompts=2, samples_per_prompt=2,
                                generation={"max_new_tokens": 8, "batch_size": 4}, pair_builder={"margin": 0.0})
    config["trainer"].update(callbacks=callbacks, max_steps=max_steps, default_root_dir=str(run),
                             val_check_interval=None, enable_progress_bar=False, **trainer)
    config["model"]["policy"]["init_args"]["model"] = tiny_model_dir
    config["model"]["policy"]["init_args"]["adapter"]["dropout"] = 0.1
    config["data"].update(train_file=write_data(run.parent / "train.jsonl"), val_fraction=val_fraction, max_length=64)
    path = run.parent / f"{run.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return ["fit", "--config", str(path)]


def env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))


def metrics(run: Path, version: str = "*") -> dict[tuple[int, str], str]:
    """(step, metric) -> value over the run's CSV logs (later versions win)."""
    out = {}
    for path in sorted(run.glob(f"logs/{version}/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        for row in csv.DictReader(open(path)):
            for key, value in row.items():
                if value and key not in ("epoch", "step") and not key.endswith(NOT_DETERMINISTIC):
                    out[(int(row["step"]), key)] = value
    return out


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def wait_for(condition, timeout: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the fit exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> Path:
    """An uninterrupted 8-step fit, every second step checkpointed (all kept)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert run_cli(fit_args(tiny_model_dir, run, 8)) == 0
    return run


# -- stop and resume -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tiny_model_dir, tmp_path, signum):
    run = tmp_path / "run"
    # No periodic checkpoint would ever be written: whatever is there came from the signal.
    # 20 training records (5 batches per epoch) and 4 for validation.
    args = fit_args(tiny_model_dir, run, max_steps=100_000, every=100_000, val_fraction=0.2)
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, env=env(),
                                stdout=out, stderr=err)
        # rollouts.jsonl is written by the first conscience step, inside the training loop.
        wait_for(lambda: (run / "rollouts.jsonl").is_file(), 300, proc, "training started")
        proc.send_signal(signum)
        rc = proc.wait(timeout=120)
    stdout, stderr = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert rc == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    name = signal.Signals(signum).name
    assert f"{name}: stopped at step" in stdout and "--ckpt_path last" in stdout
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = load(last)
    step = checkpoint["global_step"]
    assert step >= 1
    # Everything a resume needs.
    assert checkpoint["optimizer_states"] and checkpoint["lr_schedulers"] and checkpoint["rng_states"]
    assert checkpoint["state_dict"] and all("lora_" in k for k in checkpoint["state_dict"])
    assert "pairs" in checkpoint["pair_queue"]
    assert (checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"]
            == (step - 1) % 5 + 1)  # data position
    assert not (run / "adapter").exists()  # a stopped fit is not a finished one
    logged = metrics(run)
    assert (step - 1, "train/loss") in logged or (step - 1, "task/loss") in logged  # the last step's metrics are kept
    if step < 5:  # no epoch-end validation was due: none ran on the way out either
        assert not [k for k in logged if k[1] == "val/loss"]
    if signum == signal.SIGTERM:
        resume = fit_args(tiny_model_dir, run, max_steps=step + 2, every=100_000, val_fraction=0.2)
        assert run_cli(resume + ["--ckpt_path", "last"]) == 0
        assert load(last)["global_step"] == step + 2


@pytest.mark.slow
def test_kill9_resumes_at_the_same_step_with_the_same_queue_and_matches_an_uninterrupted_fit(tiny_model_dir, reference,
                                                                                             tmp_path):
    run = tmp_path / "run"
    args = fit_args(tiny_model_dir, run, 8)
    # The fit as cli.py runs it, with a pause after each checkpoint so the kill lands mid-fit.
    driver = tmp_path / "slow.py"
    driver.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import emalign.training.checkpoint as c\n"
        "save = c.save_atomic\n"
        "c.save_atomic = lambda *a, **k: (save(*a, **k), time.sleep(1.0))\n"
        "from emalign.commands import cli\n"
        "cli.main(sys.argv[1:])\n"
    )
    last = run / "checkpoints" / "last.ckpt"
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.Popen([sys.executable, str(driver), *args], cwd=ROOT, env=env(), stdout=out,
                                stderr=subprocess.STDOUT)
        wait_for(last.is_file, 300, proc, "the first checkpoint")
        proc.kill()  # SIGKILL: nothing runs after it
        assert proc.wait(timeout=60) == -signal.SIGKILL
    killed = load(last)
    step = killed["global_step"]
    assert 2 <= step < 8 and step % 2 == 0
    expected = load(next(reference.glob(f"checkpoints/*step={step}.ckpt")))
    assert killed["pair_queue"] == expected["pair_queue"]  # the same queue
    assert all(torch.equal(killed["state_dict"][k], v) for k, v in expected["state_dict"].items())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_cli(args + ["--ckpt_path", "last"]) == 0
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert load(last)["global_step"] == 8
    latest = max((p.parent.name for p in run.glob("logs/version_*/metrics.csv")), key=lambda n: int(n.split("_")[1]))
    resumed, uninterrupted = metrics(run, latest), metrics(reference)
    assert min(s for s, _ in resumed) == step  # it went on from the checkpoint's step
    after = {k: v for k, v in uninterrupted.items() if k[0] >= step}
    assert {"train/loss", "align/loss", "conscience/queue_size"} <= {name for _, name in after}
    assert {k: v for k, v in resumed.items() if k[0] >= step} == after


@pytest.mark.slow
def test_same_seed_same_metrics(tiny_model_dir, reference, tmp_path):
    run = tmp_path / "again"
    assert run_cli(fit_args(tiny_model_dir, run, 8)) == 0
    first, second = metrics(reference), metrics(run)
    assert len(first) > 50 and first == second


def test_a_crash_while_writing_leaves_the_previous_checkpoint_loadable(tiny_policy, tmp_path, monkeypatch):
    import lightning.fabric.plugins.io.torch_io as torch_io

    from emalign.data.chat import ChatDataModule
    from emalign.training.checkpoint import RunCheckpoint, check_checkpoint
    from emalign.training.module import EmergentAlignment

    real = torch_io._atomic_save

    def killed_midway(checkpoint, filepath):
        if "last" in str(filepath) and checkpoint["global_step"] == 3:
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            with open(filepath, "wb") as handle:
                handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            raise OSError("killed while writing")
        real(checkpoint, filepath)

    monkeypatch.setattr(torch_io, "_atomic_save", killed_midway)
    trainer = L.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[RunCheckpoint(every_n_train_steps=1, save_last=True)])
    data = ChatDataModule(train_file=write_data(tmp_path / "train.jsonl"), val_fraction=0.0, batch_size=4,
                          max_length=64)
    data.connect(tiny_policy.tokenizer)
    with pytest.raises(OSError, match="killed while writing"):
        trainer.fit(EmergentAlignment(tiny_policy), data)
    last = tmp_path / "checkpoints" / "last.ckpt"
    # The broken write went to the .partial (else last.ckpt would not load), and an error raised in the
    # process removes it: a half-written file only takes the space a retry needs.
    assert not (tmp_path / "checkpoints" / "last.ckpt.partial").exists()
    check_checkpoint(last)
    assert load(last)["global_step"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "flipped byte"])
def test_corrupt_checkpoint_is_one_clear_error_and_the_previous_one_still_resumes(tiny_model_dir, reference, tmp_path,
                                                                                  capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run / "checkpoints")
    last = run / "checkpoints" / "last.ckpt"
    data = bytearray(last.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0xFF
    last.write_bytes(bytes(data))
    os.utime(last)  # newest: what --ckpt_path last picks
    args = fit_args(tiny_model_dir, run, 10)
    for ckpt_path in ("last", str(last)):
        capsys.readouterr()
        assert run_cli(args + ["--ckpt_path", ckpt_path]) == 2
        err = capsys.readouterr().err
        assert f"error: checkpoint {last} is truncated or corrupt (" in err
        previous = run / "checkpoints" / "epoch=1-step=8.ckpt"  # the periodic checkpoint of the same step
        assert f"--ckpt_path {previous}" in err and "Traceback" not in err
    assert run_cli(args + ["--ckpt_path", str(previous)]) == 0
    newest = max((run / "checkpoints").glob("last*.ckpt"), key=os.path.getmtime)
    assert load(newest)["global_step"] == 10


def test_missing_checkpoint_is_one_clear_error(tiny_model_dir, tmp_path, capsys):
    assert run_cli(fit_args(tiny_model_dir, tmp_path / "run", 2) + ["--ckpt_path", str(tmp_path / "nope.ckpt")]) == 2
    assert f"error: checkpoint {tmp_path / 'nope.ckpt'}: no such file" in capsys.readouterr().err


# -- non-finite losses ---------------------------------------------------------------------------


class Snapshots(L.Callback):
    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append({k: v.detach().clone() for k, v in pl_module.policy.trainable_state_dict().items()})


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _nan_fit(tiny_policy, tmp_path, monkeypatch, bad_steps, max_steps, **module_kwargs):
    from emalign.data.chat import ChatDataModule
    from emalign.training.checkpoint import RunCheckpoint
    from emalign.training.module import EmergentAlignment

    original = EmergentAlignment.training_step

    def poisoned(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.global_step in bad_steps else loss

    monkeypatch.setattr(EmergentAlignment, "training_step", poisoned)
    module = EmergentAlignment(tiny_policy, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), scheduler=None,
                               **module_kwargs)
    snapshots = Snapshots()
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, gradient_clip_val=1.0,
                        callbacks=[snapshots, RunCheckpoint(every_n_train_steps=1000, save_last=True)])
    data = ChatDataModule(train_file=write_data(tmp_path / "train.jsonl"), val_fraction=0.0, batch_size=4,
                          max_length=64)
    data.connect(module.tokenizer)
    return module, trainer, snapshots, lambda: trainer.fit(module, data)


def test_nonfinite_loss_skips_the_update_and_is_counted(tiny_policy, tmp_path, monkeypatch):
    module, trainer, snaps, fit = _nan_fit(tiny_policy, tmp_path, monkeypatch, bad_steps={1, 2}, max_steps=5)
    fit()
    weights = snaps.weights
    assert trainer.global_step == 5
    assert not _same(weights[0], weights[3])  # steps 0 and 3 trained ...
    assert _same(weights[0], weights[1]) and _same(weights[0], weights[2])  # ... 1 and 2 left everything as it was
    assert all(torch.isfinite(v).all() for v in weights[-1].values())
    optimizer_state = next(iter(trainer.optimizers[0].state.values()))
    assert int(optimizer_state["step"]) == 3  # Adam stepped 3 times (0, 3, 4), its moments untouched by NaN
    assert all(torch.isfinite(s["exp_avg"]).all() for s in trainer.optimizers[0].state.values())
    assert module.skipped_steps == 2 and float(trainer.logged_metrics["train/skipped_steps"]) == 2


def test_too_many_nonfinite_in_a_row_stop_with_the_last_good_weights_saved(tiny_policy, tmp_path, monkeypatch):
    from emalign.training.module import NonFiniteLossError

    module, trainer, snaps, fit = _nan_fit(tiny_policy, tmp_path, monkeypatch, bad_steps=set(range(2, 100)),
                                           max_steps=50, max_nonfinite_in_a_row=3)
    with pytest.raises(NonFiniteLossError) as info:
        fit()
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert isinstance(info.value, UserError)  # cli.py prints it as one `error:` line
    assert "3 non-finite losses in a row (steps 2 to 4)" in str(info.value) and str(last) in str(info.value)
    saved = load(last)
    assert saved["global_step"] == 5
    assert _same({f"policy.{k}": v for k, v in snaps.weights[1].items()}, saved["state_dict"])  # the last finite step's


@pytest.mark.slow
def test_nonfinite_loss_on_one_ddp_rank_skips_on_all_without_hanging(tiny_model_dir, tmp_path):
    """Returning None from training_step on one rank would leave the other waiting in backward's all-reduce."""
    run = tmp_path / "ddp"
    driver = tmp_path / "nan_on_rank1.py"
    driver.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from emalign.training.module import EmergentAlignment\n"
        "step = EmergentAlignment.training_step\n"
        "def poisoned(self, batch, batch_idx):\n"
        "    loss = step(self, batch, batch_idx)\n"
        "    return loss * float('nan') if (self.global_rank, self.global_step) == (1, 1) else loss\n"
        "EmergentAlignment.training_step = poisoned\n"
        "from emalign.commands import cli\n"
        "cli.main(sys.argv[1:])\n"
    )
    args = fit_args(tiny_model_dir, run, 3, every=100) + ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    done = subprocess.run([sys.executable, str(driver), *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = load(run / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 3 and checkpoint["emalign"]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
