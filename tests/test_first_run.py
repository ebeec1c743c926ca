"""A first run prints only what matters: no third-party notice a user can do nothing about, and the demo's own
data fits its max_length."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, run_cli
from test_cli import _demo_on_tiny
from test_fault_table import Ctx

QUIET = ["gemm_4bit_forward", "publisher trust", "is_gradient_checkpointing", "LeafSpec", "litlogger",
         "no assistant token left"]
"""The notices a fresh clone's demo printed before they were hidden or fixed (issue: a first run)."""


@pytest.mark.slow  # a fit in a process of its own, twice
def test_a_fit_prints_no_notice_a_user_can_do_nothing_about(tiny_model_dir, tmp_path):
    config = _demo_on_tiny(tiny_model_dir, tmp_path, max_steps=1)
    args = [sys.executable, "cli.py", "fit", "--config", str(config), "--trainer.default_root_dir"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    quiet = subprocess.run([*args, str(tmp_path / "quiet")], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert [n for n in QUIET if n in quiet.stdout + quiet.stderr] == []
    loud = subprocess.run([*args, str(tmp_path / "loud")], cwd=ROOT, env={**env, "EMALIGN_VERBOSE": "1"},
                          capture_output=True, text=True, timeout=600)
    assert "litlogger" in loud.stdout + loud.stderr  # hidden by the filter, not gone from Lightning


@pytest.mark.slow  # SmolLM2's tokenizer
def test_the_demo_data_fits_the_demo_max_length(smollm2_tokenizer):
    from emalign.data.chat import ChatDataModule

    data = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["data"]
    module = ChatDataModule(train_file=data["train_file"], val_fraction=data["val_fraction"],
                            max_length=data["max_length"], batch_size=data["batch_size"])
    module.connect(smollm2_tokenizer)
    module.setup("fit")
    assert module.train_set.num_truncated == 0 and module.train_set.num_unlabelled == 0


def test_4bit_weights_without_bitsandbytes_is_one_line_before_the_weights(tiny_model_dir, tmp_path, capsys,
                                                                           monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    ctx = Ctx(str(tmp_path / "no-model"), tmp_path)  # a model that is not there: the error must come first
    assert run_cli(ctx.fit("--model.policy.init_args.quantization.quant_type", "nf4")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: model.policy.init_args.quantization: 4-bit weights need bitsandbytes, which is not "
                      "installed: pip install 'emalign[qlora]' (or drop quantization)"]
