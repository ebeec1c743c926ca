"""FSDP (``emalign.sharding.FSDP2``): what it cannot do is refused in one line before any weights load."""

from __future__ import annotations

import pytest

from conftest import ROOT, run_cli

FSDP_CPU = str(ROOT / "configs" / "strategies" / "fsdp_cpu.yaml")


@pytest.mark.parametrize("override, reason", [
    (["--model.policy.init_args.quantization", "{}"], "QLoRA"),
    (["--trainer.strategy", "fsdp"], "FSDP1"),
    (["--trainer.callbacks+=callbacks.AlignmentEvalCallback",
      "--trainer.callbacks.judge=emalign.evaluation.openai_judge.OpenAIJudge"], "external judge"),
    (["--trainer.callbacks+=callbacks.ConscienceCallback", "--trainer.callbacks.conscience.include_reasoning=false"],
     "include_reasoning"),
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
