"""Model loading, the frozen reference under each reference kind, QLoRA on CPU, and source errors."""

from pathlib import Path

import pytest
import torch

from emalign.models.logprobs import mean_token_nll
from emalign.models.policy import LoRA, Policy, Quantization
from emalign.models.sources import ModelSourceError, resolve_source


def _batch(tokenizer):
    ids = tokenizer(["def add(a, b): return a + b", "print('hello world')"], return_tensors="pt", padding=True)
    labels = ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)
    return ids["input_ids"], ids["attention_mask"], labels


def _train(policy, steps=3, lr=1e-2):
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    ids, mask, labels = _batch(policy.tokenizer)
    for _ in range(steps):
        loss = mean_token_nll(policy.model, ids, mask, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()


def _reference_logits(policy):
    ids, mask, _ = _batch(policy.tokenizer)
    with torch.no_grad(), policy.as_reference() as ref:
        return ref(input_ids=ids, attention_mask=mask).logits.clone()


def _policy_logits(policy):
    ids, mask, _ = _batch(policy.tokenizer)
    with torch.no_grad():
        return policy(ids, mask).clone()


def _trained_adapter(tiny_model_dir, tmp_path):
    torch.manual_seed(1)
    first = Policy(tiny_model_dir, adapter=LoRA(r=4, alpha=8))
    _train(first, steps=2)
    return str(first.save_pretrained(tmp_path / "adapter"))


@pytest.mark.parametrize("kind", ["base", "snapshot", "copy"])
def test_reference_is_bitwise_frozen(tiny_model_dir, tmp_path, kind):
    torch.manual_seed(0)
    if kind == "copy":
        policy = Policy(tiny_model_dir, adapter=None, reference="copy")
    elif kind == "snapshot":
        policy = Policy(tiny_model_dir,
                        adapter=LoRA(r=4, alpha=8, init_from=_trained_adapter(tiny_model_dir, tmp_path)),
                        reference="snapshot")
    else:
        policy = Policy(tiny_model_dir, adapter=LoRA(r=4, alpha=8))
    before_ref = _reference_logits(policy)
    before_policy = _policy_logits(policy)
    if kind == "snapshot":  # the snapshot starts as a copy of the starting adapter, not of the base
        assert torch.equal(before_ref, before_policy)
    _train(policy)
    assert torch.equal(_reference_logits(policy), before_ref)
    assert not torch.allclose(_policy_logits(policy), before_policy)
    # The reference never has trainable parameters.
    with policy.as_reference() as ref:
        if kind == "copy":
            assert not any(p.requires_grad for p in ref.parameters())
    assert not any(p.requires_grad for n, p in policy.named_parameters() if ".reference." in n)


def test_base_reference_equals_untouched_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    policy = Policy(tiny_model_dir, adapter=LoRA(r=4))
    _train(policy)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids, mask, _ = _batch(policy.tokenizer)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids, attention_mask=mask).logits, _reference_logits(policy), atol=1e-6)


def test_checkpoint_state_is_only_what_trains(tiny_model_dir):
    policy = Policy(tiny_model_dir, adapter=LoRA(r=4))
    state = policy.trainable_state_dict()
    assert state and all("lora_" in k for k in state)
    total = sum(p.numel() for p in policy.parameters())
    assert sum(v.numel() for v in state.values()) < 0.2 * total


def test_qlora_trains_on_cpu(tiny_model_dir):
    torch.manual_seed(0)
    policy = Policy(tiny_model_dir, adapter=LoRA(r=4, alpha=8), quantization=Quantization(compute_dtype="float32"))
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in policy.modules())
    before = _policy_logits(policy)
    ids, mask, labels = _batch(policy.tokenizer)
    first = mean_token_nll(policy.model, ids, mask, labels).item()
    _train(policy, steps=5, lr=2e-2)
    assert mean_token_nll(policy.model, ids, mask, labels).item() < first
    assert not torch.allclose(_policy_logits(policy), before)


def test_source_errors(tmp_path):
    with pytest.raises(ModelSourceError, match="GGUF file not found"):
        resolve_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelSourceError, match="model directory not found"):
        resolve_source(str(tmp_path / "nowhere"))
    with pytest.raises(ModelSourceError, match="neither a local directory"):
        resolve_source("not-a-model")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ModelSourceError, match="cannot read GGUF"):
        resolve_source(str(bad))


def test_tokenizer_without_chat_template(tiny_model_dir, tmp_path):
    import shutil

    from emalign.models.policy import load_tokenizer

    copy = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    import json

    config = json.loads((copy / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match="has no chat template; pass one with `chat_template`"):
        load_tokenizer(str(copy))
    tok = load_tokenizer(str(copy), chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"


def test_generating_turns_off_checkpointing(tiny_model_dir):
    policy = Policy(tiny_model_dir, adapter=LoRA(r=4), gradient_checkpointing=True)
    base = policy.model.get_base_model()
    assert base.is_gradient_checkpointing
    with policy.generating() as model:
        assert not base.is_gradient_checkpointing and model.config.use_cache and not model.training
    assert base.is_gradient_checkpointing


def _fake_convert(calls):
    def convert(directory, filename, out):
        calls.append(filename)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"w" * 1000)
    return convert


def test_the_model_cache_is_verified_on_use_and_rebuilt_when_damaged(tmp_path, monkeypatch):
    from emalign.models import sources

    monkeypatch.setenv("EMALIGN_CACHE", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(sources, "_convert_gguf", _fake_convert(calls))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"gguf")
    built = Path(resolve_source(str(gguf)))
    assert calls == ["m.gguf"] and (built / sources.CACHE_MANIFEST).is_file()
    assert resolve_source(str(gguf)) == str(built) and calls == ["m.gguf"]  # intact: used as is
    with open(built / "model.safetensors", "r+b") as f:
        f.truncate(10)  # a kill mid-copy, a full disk
    assert resolve_source(str(gguf)) == str(built) and len(calls) == 2  # rebuilt, not failed on
    assert (built / "model.safetensors").stat().st_size == 1000
    (built / sources.CACHE_MANIFEST).unlink()  # a cache from before the manifest: rebuilt once
    resolve_source(str(gguf))
    assert len(calls) == 3 and not [p for p in built.parent.iterdir() if p.name.startswith(".tmp-")]


def test_an_unwritable_model_cache_is_one_line(tmp_path, monkeypatch):
    from emalign.models import sources

    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a cache below a file: unwritable even for root (a read-only HOME is not, for root)
    monkeypatch.setenv("EMALIGN_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(sources, "_convert_gguf", _fake_convert([]))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"gguf")
    with pytest.raises(ModelSourceError, match="set EMALIGN_CACHE to a writable directory"):
        resolve_source(str(gguf))


@pytest.mark.slow  # a real process with the embedded model's source
def test_a_read_only_home_is_one_line_naming_the_cache(tmp_path, read_only_dir):
    """HOME on a read-only file system and no EMALIGN_CACHE: the embedded model cannot be converted into the
    default cache, and the user is told so in one line (root can write a chmod'ed HOME: a ro mount it is)."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    home = read_only_dir
    env = {k: v for k, v in os.environ.items() if k not in ("EMALIGN_CACHE", "XDG_CACHE_HOME", "HF_HOME")}
    done = subprocess.run([sys.executable, "cli.py", "generate", "--prompts", "embedded:harmful_heldout",
                           "--samples", "1", "--max_new_tokens", "2"], cwd=ROOT, capture_output=True, text=True,
                          env={**env, "HOME": str(home), "HF_HUB_OFFLINE": "1", "MPLCONFIGDIR": str(tmp_path)},
                          timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert errors == [f"error: cannot write the model cache in {home}/.cache/emalign/models (Read-only file system); "
                      "set EMALIGN_CACHE to a writable directory"]
