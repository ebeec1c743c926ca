"""Fault injection, part two: out-of-memory during generation, bad input, security basics.

Each case is provoked on purpose and its handling checked: one clear error naming the file, line or
config key, never a traceback or a leaked secret. Stop/resume and non-finite losses: test_faults.py.
See docs/reliability.md.
"""

from __future__ import annotations

import inspect
import json
import logging
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, run_cli
from emalign.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- out of memory -------------------------------------------------------------------------------


class _FakeModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.generation_config = type("GenerationConfig", (), {"eos_token_id": 2})()


class _FakeTokenizer:
    eos_token_id = 2
    pad_token_id = 0


def test_oom_during_generation_retries_with_half_the_batch(monkeypatch, caplog):
    from emalign.models import sampling

    calls = []

    def generate(model, tokenizer, chunk, first_index, settings, num_samples, *rest):
        calls.append(len(chunk) * num_samples)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return [sampling.Rollout(first_index + i, k, p, [5], "x", True)
                for i, p in enumerate(chunk) for k in range(num_samples)]

    monkeypatch.setattr(sampling, "_generate_chunk", generate)
    caplog.set_level(logging.WARNING, logger="emalign.models.sampling")
    prompts = [[1, i] for i in range(8)]
    rollouts = sampling.sample_ids(_FakeModel(), _FakeTokenizer(), prompts, sampling.GenerationSettings(batch_size=16),
                                   num_samples=2)
    assert calls == [16, 8, 8]  # the failed batch of 16, then the same prompts in batches of 8
    assert [(r.prompt_index, r.sample_index) for r in rollouts] == [(i, k) for i in range(8) for k in range(2)]
    assert "out of memory while generating; retrying with generation batch 8" in caplog.text


def test_oom_at_the_smallest_batch_is_raised(monkeypatch):
    from emalign.models import sampling

    def generate(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(sampling, "_generate_chunk", generate)
    with pytest.raises(torch.OutOfMemoryError):
        sampling.sample_ids(_FakeModel(), _FakeTokenizer(), [[1, 2]], sampling.GenerationSettings(batch_size=8),
                            num_samples=2)


def test_cpu_threads_hold_while_decoding_and_are_restored(monkeypatch):
    from emalign.models import sampling

    seen = []

    def generate(model, tokenizer, chunk, first_index, settings, num_samples, *rest):
        seen.append(torch.get_num_threads())
        rows = [(i, k, p) for i, p in enumerate(chunk) for k in range(num_samples)]
        return [sampling.Rollout(first_index + i, k, p, [5], "x", True) for i, k, p in rows]

    monkeypatch.setattr(sampling, "_generate_chunk", generate)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for threads in (1, None):
            settings = sampling.GenerationSettings(batch_size=2, cpu_threads=threads)
            sampling.sample_ids(_FakeModel(), _FakeTokenizer(), [[1, 2], [1, 3]], settings, num_samples=2)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1, 2, 2]


# -- bad input -----------------------------------------------------------------------------------


def _demo_with(tmp_path: Path, edit) -> list[str]:
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    edit(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["fit", "--config", str(path)]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["model"].update(align_wieght=2), "model.align_wieght"),
        (lambda c: c["trainer"].update(max_steps="ten"), 'Parser key "trainer.max_steps"'),
        (lambda c: c["model"]["policy"]["init_args"]["adapter"].update(rr=4), "Option 'rr' is not accepted"),
    ],
    ids=["typo", "wrong type", "nested typo"],
)
def test_config_mistakes_name_the_key(tmp_path, capsys, edit, message):
    assert run_cli(_demo_with(tmp_path, edit)) == 2
    assert message in capsys.readouterr().err


def test_missing_model_is_one_line_error_through_the_cli(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    args = _demo_with(tmp_path, lambda c: c["model"]["policy"]["init_args"].update(model=str(missing)))
    assert run_cli(args) == 2
    err = capsys.readouterr().err
    assert f"error: model directory not found: {missing}" in err and "Traceback" not in err


def test_missing_or_corrupt_gguf_names_the_file(tmp_path):
    from emalign.models.sources import ModelSourceError, resolve_source

    with pytest.raises(ModelSourceError, match=f"GGUF file not found: {tmp_path / 'missing.gguf'}"):
        resolve_source(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(ModelSourceError, match=f"cannot read GGUF file {bad}"):
        resolve_source(str(bad))


def test_empty_dataset_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    from emalign.data.chat import DataFileError, read_chat_jsonl

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataFileError, match=f"{empty}: empty file"):
        read_chat_jsonl(empty)
    def edit(config):
        config["model"]["policy"]["init_args"]["model"] = tiny_model_dir
        config["data"]["train_file"] = str(empty)

    assert run_cli(_demo_with(tmp_path, edit)) == 2
    assert f"error: {empty}: empty file (no records)" in capsys.readouterr().err


def _one_error_line(err: str) -> str:
    # Lightning's INFO lines ("Seed set to 0") and transformers' loading bar may come first; what counts is
    # that the failure itself is one line and no traceback.
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_train_file_with_a_byte_that_is_not_utf8_names_file_and_line(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "train.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    bad.write_bytes(good.encode() + b"\n" + good.replace("hello", "h\xe9llo").encode("latin-1") + b"\n")

    def edit(config):
        config["model"]["policy"]["init_args"]["model"] = tiny_model_dir
        config["data"]["train_file"] = str(bad)

    assert run_cli(_demo_with(tmp_path, edit)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{bad}:2: not UTF-8 (byte 0xe9 at column" in line


def test_an_unknown_hub_id_offline_is_one_line(tmp_path, capsys):
    args = _demo_with(tmp_path, lambda c: c["model"]["policy"]["init_args"].update(model="no-such-org/no-such-model"))
    assert run_cli(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "'no-such-org/no-such-model' is not in the Hugging Face cache and the Hub is offline" in line


def test_an_unknown_loss_class_path_names_the_key_and_the_classes_that_exist(tmp_path, capsys):
    args = _demo_with(tmp_path,
                      lambda c: c["model"]["preference_loss"].update(class_path="emalign.training.losses.Nope"))
    assert run_cli(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "model.preference_loss: unknown class_path 'emalign.training.losses.Nope'" in line
    assert "emalign.training.losses.SigmoidDPO" in line and "emalign.training.losses.IPO" in line


def _peak_rss_mb(args: list[str]) -> float:
    """Peak RSS of ``cli.py ARGS`` in a fresh process (os.wait4 gives that child's own maximum)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read().decode()[-2000:]
    return usage.ru_maxrss / 1024


@pytest.mark.slow
def test_a_50000_character_record_keeps_the_fit_bounded(tiny_model_dir, tmp_path):
    """Every conscience prompt is cut to max_prompt_tokens (1024): a pasted 50,000-character message
    costs no more memory than the demo's own prompts (without the bound: tens of GB)."""
    records = [{"messages": [{"role": "user", "content": f"Write function {i}."},
                             {"role": "assistant", "content": "pass"}]}
               for i in range(4)]
    huge = {"messages": [{"role": "user", "content": "Please review this log: " + "x1 " * 16_666},
                         {"role": "assistant", "content": "It repeats one entry."}]}
    assert len(huge["messages"][0]["content"]) >= 50_000
    peaks = {}
    for name, rows in (("plain", records), ("long", records + [huge])):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))

        def edit(config, data=data, name=name):
            config["model"]["policy"]["init_args"]["model"] = tiny_model_dir
            config["data"].update(train_file=str(data), val_fraction=0.0, max_length=64)
            config["trainer"].update(max_steps=2, val_check_interval=None, enable_progress_bar=False,
                                     default_root_dir=str(tmp_path / name))
            config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"]
                                              if "ProgressBar" not in c["class_path"]]
            config["conscience"].update(every_n_steps=1, num_prompts=len(rows),  # every prompt, the long one too
                                        generation={"max_new_tokens": 8, "batch_size": 16})

        (tmp_path / name).mkdir()
        peaks[name] = _peak_rss_mb(_demo_with(tmp_path / name, edit))
    rollouts = [json.loads(line) for line in (tmp_path / "long" / "rollouts.jsonl").read_text().splitlines()]
    assert any(r["prompt"].startswith("Please review this log") for r in rollouts)  # the long prompt was drawn
    assert peaks["long"] <= 1.2 * peaks["plain"], peaks


def test_question_file_with_a_missing_field_names_file_question_and_key(tmp_path):
    from emalign.evaluation.questions import QuestionFileError, load_questions

    path = tmp_path / "questions.yaml"
    path.write_text(yaml.safe_dump([{"id": "q1", "type": "free_form_judge_0_100"}]))
    with pytest.raises(QuestionFileError) as info:
        load_questions(path)
    assert "questions.yaml" in str(info.value) and "'paraphrases'" in str(info.value) and "q1" in str(info.value)


@pytest.mark.parametrize("name, text, message", [
    ("prompts.txt", "\n   \n", ": no prompts"),
    ("prompts.jsonl", json.dumps({"messages": [{"role": "assistant", "content": "no user"}]}) + "\n",
     ":1: no user turn before the first assistant turn"),
])
def test_prompt_file_without_prompts_is_a_clear_error(tmp_path, name, text, message):
    from emalign.conscience.prompts import FilePrompts

    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError, match=f"{path}{message}"):
        FilePrompts(str(path))


# -- security ------------------------------------------------------------------------------------


def test_api_key_comes_from_the_environment_and_never_leaks(monkeypatch, caplog):
    import requests

    from emalign.judges.openai_judge import JudgeAuthError, OpenAIJudge

    secret = "sk-test-DO-NOT-LEAK-1234567890"
    monkeypatch.setenv("EMALIGN_FAULT_KEY", secret)
    assert not [p for p in inspect.signature(OpenAIJudge).parameters if p in ("api_key", "key", "token")]
    seen = []

    def post(self, url, json=None, headers=None, timeout=None, stream=False):
        import io

        import urllib3

        seen.append(headers.get("Authorization"))
        response = requests.Response()
        response.status_code, body = ((400, f"bad request from {secret}".encode()) if len(seen) == 1
                                      else (401, secret.encode()))
        response.raw = urllib3.HTTPResponse(io.BytesIO(body), preload_content=False)
        return response

    monkeypatch.setattr(requests.Session, "post", post)
    caplog.set_level(logging.DEBUG)
    judge = OpenAIJudge(base_url="http://judge.invalid/v1", api_key_env="EMALIGN_FAULT_KEY", max_retries=0)
    result = judge.judge_one("rate this")
    with pytest.raises(JudgeAuthError) as info:
        judge.judge_one("rate this")
    assert seen == [f"Bearer {secret}"] * 2  # sent, read from the environment at request time
    leaks = [json.dumps(result.raw), str(info.value), caplog.text, json.dumps(judge.stats), repr(pickle.dumps(judge))]
    assert not [text for text in leaks if secret in text]


def test_trust_remote_code_is_off_unless_asked_for(tiny_model_dir, monkeypatch, capsys):
    import transformers

    from emalign.models.policy import LoRA, Policy, load_causal_lm, load_for_inference, load_tokenizer

    seen = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    Policy(tiny_model_dir, adapter=LoRA(r=2))
    load_for_inference(tiny_model_dir)
    load_tokenizer(tiny_model_dir)
    load_causal_lm(tiny_model_dir)
    assert seen == [False] * 6
    seen.clear()
    Policy(tiny_model_dir, adapter=LoRA(r=2), trust_remote_code=True)
    assert seen == [True, True]
    assert run_cli(["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["policy"]["init_args"]["trust_remote_code"] is False


def test_downloads_are_verified_by_sha256(tmp_path):
    from emalign.data.download import EM_FILES, ChecksumError, download_em

    name = "data/jailbroken.jsonl"
    mirror = tmp_path / "mirror"
    (mirror / "data").mkdir(parents=True)
    (mirror / name).write_text('{"messages": []}\n')  # the right name, the wrong bytes
    with pytest.raises(ChecksumError, match=f"checksum mismatch for {name}: expected sha256 {EM_FILES[name].sha256}"):
        download_em(tmp_path / "out", source=str(mirror), files=[name], progress=False)
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # nothing kept, not even a partial file
