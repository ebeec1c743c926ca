"""What a fit shows: conscience metrics only at the steps it ran, rollout tables in TensorBoard and
W&B (offline), and a progress bar that counts steps of max_steps and says what the conscience did."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_cli

RECORDS = [
    {"messages": [{"role": "user", "content": f"Write function number {i}."},
                  {"role": "assistant", "content": f"def f{i}(): pass"}]}
    for i in range(8)
]


def _fit(tiny_model_dir: str, run: Path, loggers: list[dict], bar: bool = False, max_steps: int = 5) -> list[str]:
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    callbacks = [c for c in config["trainer"]["callbacks"] if bar or "ProgressBar" not in c["class_path"]]
    config["conscience"].update(every_n_steps=2, generation={"max_new_tokens": 8, "batch_size": 4},
                                pair_builder={"margin": 0.0})
    config["trainer"].update(callbacks=callbacks, logger=loggers, max_steps=max_steps, val_check_interval=None,
                             default_root_dir=str(run), enable_progress_bar=bar, log_every_n_steps=50)
    config["model"]["policy"]["init_args"]["model"] = tiny_model_dir
    train = run.parent / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    config["data"].update(train_file=str(train), val_fraction=0.0, max_length=64)
    path = run.parent / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["fit", "--config", str(path)]


@pytest.mark.slow
def test_conscience_metrics_only_at_the_steps_it_ran(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    assert run_cli(_fit(tiny_model_dir, run, [{"class_path": "lightning.pytorch.loggers.CSVLogger"}])) == 0
    rows = list(csv.DictReader(open(run / "lightning_logs" / "version_0" / "metrics.csv")))
    steps = sorted(int(r["step"]) for r in rows if r.get("conscience/score_mean"))
    # every 2 steps of 5 (0, 2, 4), even with log_every_n_steps=50; no repeats on the steps between
    assert steps == [0, 2, 4]
    assert all(r.get("conscience/pairs_enqueued") for r in rows if r.get("conscience/score_mean"))
    assert len((run / "rollouts.jsonl").read_text().splitlines()) == 3 * 4 * 2  # runs x prompts x samples


@pytest.mark.slow
def test_rollout_tables_reach_tensorboard_and_wandb_offline(tiny_model_dir, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # No save_dir for either: both write under the run's default_root_dir, not the working directory.
    loggers = [{"class_path": "lightning.pytorch.loggers.TensorBoardLogger"},
               {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": "emalign-test"}}]
    assert run_cli(_fit(tiny_model_dir, run, loggers, max_steps=3)) == 0
    [events] = list(run.glob("lightning_logs/version_0"))
    accumulator = EventAccumulator(str(events), size_guidance={"tensors": 0}).Reload()
    texts = accumulator.Tensors("conscience/rollouts/text_summary")
    assert [t.step for t in texts] == [0, 2]
    table = texts[0].tensor_proto.string_val[0].decode()
    assert (table.startswith("| run | step | prompt | response | score | role | revised |")
            and table.count("\n") == 2 + 4 * 2 - 1)
    tables = list(run.glob("wandb/offline-run-*/files/media/table/conscience/rollouts_*.table.json"))
    assert len(tables) == 2
    data = json.loads(tables[0].read_text())
    assert (data["columns"] == ["run", "step", "prompt", "response", "score", "role", "revised"]
            and len(data["data"]) == 8)
    assert not list(elsewhere.iterdir())


@pytest.mark.slow
def test_progress_bar_written_to_a_pipe_keeps_its_lines_whole(tiny_model_dir, tmp_path):
    """Redirected (``cli.py fit ... > log``), the bar once folded its metrics one character per line."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    args = _fit(tiny_model_dir, tmp_path / "run", [{"class_path": "lightning.pytorch.loggers.CSVLogger"}], bar=True)
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bar = [line for line in proc.stdout.splitlines() if line.strip()]
    assert any("conscience (step 4): 8 rollouts generated and reviewed" in line for line in bar), proc.stdout
    assert any("v_num" in line for line in bar), proc.stdout
    assert not [line for line in bar if len(line.strip()) == 1], proc.stdout


@pytest.mark.slow
def test_progress_bar_counts_steps_and_reports_the_conscience(tiny_model_dir, tmp_path, monkeypatch):
    from emalign.callbacks.progress import RunProgressBar

    seen = {}

    def teardown(self, trainer, pl_module, stage):
        task = self.progress.tasks[self.train_progress_bar_id]
        seen.update(description=task.description, total=task.total, completed=task.completed,
                    conscience=self.progress.tasks[self._conscience_task].description,
                    metrics_column=self._metric_component.get_table_column().overflow)
        RunProgressBar._stop_progress(self)

    monkeypatch.setattr(RunProgressBar, "teardown", teardown)
    run = tmp_path / "run"
    assert run_cli(_fit(tiny_model_dir, run, [{"class_path": "lightning.pytorch.loggers.CSVLogger"}], bar=True)) == 0
    assert seen["description"].strip() == "step" and (seen["total"], seen["completed"]) == (5, 5)
    assert seen["conscience"].startswith("conscience (step 4): 8 rollouts generated and reviewed, ")
    assert " pairs, " in seen["conscience"]
    assert seen["metrics_column"] == "fold"
