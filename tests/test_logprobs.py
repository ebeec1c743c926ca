"""Log-probs equal the model's own forward on every supported head, and chunking changes nothing."""

from __future__ import annotations

import pytest
import torch
import transformers

from emalign.conscience.verdict import Conscience
from emalign.models import logprobs
from emalign.models.logprobs import (
    UnsupportedHeadError,
    check_head,
    hidden_states,
    mean_token_nll,
    pair_logps,
    project,
    sequence_logps,
    token_logps,
)

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# Each head setting is set far from its default so that leaving it out changes the log-probs (the
# random tiny models' raw logits are small: Gemma's default cap of 30 would never bite).
ARCHITECTURES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "gemma2": ("Gemma2Config", dict(head_dim=8, final_logit_softcapping=0.05)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=8, final_logit_softcapping=0.05)),
    "cohere": ("CohereConfig", dict(logit_scale=8.0)),
    "granite": ("GraniteConfig", dict(logits_scaling=0.1)),
}


def tiny(arch: str, vocab_size: int, tokenizer=None):
    config_class, extra = ARCHITECTURES[arch]
    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        ids["pad_token_id"] = tokenizer.pad_token_id
    config = getattr(transformers, config_class)(vocab_size=vocab_size, **SMALL, **extra, **ids)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def model_logps(model, ids, mask):
    """The reference: the model's own forward, full vocabulary, log_softmax; [B, T-1] for tokens 1..T-1."""
    logps = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    return logps[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_logps_equal_the_models_own_forward(arch, smollm2_tokenizer):
    tok = smollm2_tokenizer
    model = tiny(arch, len(tok), tok)
    check_head(model, arch)
    prompts = [tok.encode("Hello there, how are you?"), tok.encode("Hi")]
    responses = [tok.encode(" Fine, thanks."), tok.encode(" Go away now please")]
    ids = torch.full((2, 12), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    target = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, : len(p + r)] = torch.tensor(p + r)
        mask[i, : len(p + r)] = 1
        target[i, len(p) : len(p + r)] = True
    with torch.no_grad():
        expected = model_logps(model, ids, mask)
        got = sequence_logps(model, ids, mask, target, chunk=3)
        assert torch.allclose(got, (expected * target[:, 1:]).sum(1), atol=1e-4)
        labels = torch.where(target, ids, -100)
        nll = mean_token_nll(model, ids, mask, labels, chunk=5)
        assert abs(nll.item() + expected[target[:, 1:]].mean().item()) < 1e-4
        # The raw head is not the forward for the architectures that scale or cap: the test can fail.
        states = hidden_states(model, ids, mask)
        raw = model.get_output_embeddings()(states).log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        assert torch.allclose(raw, expected, atol=1e-4) == (arch in ("llama", "qwen2"))

    # The verdict and the reference log-probs of a review, against the full forward of the review sequence.
    conscience = Conscience()
    yes, no, suffix = conscience.answer_tokens(tok)
    review = conscience.review(model, tok, prompts, responses)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = torch.tensor([p + r + suffix])
        with torch.no_grad():
            last = model(input_ids=seq).logits[0, -1].float().log_softmax(-1)
            ref = model_logps(model, seq, torch.ones_like(seq))[0, len(p) - 1 : len(p + r) - 1].sum()
        assert abs(review.scores[i].item() - (last[yes].logsumexp(-1) - last[no].logsumexp(-1)).item()) < 1e-4
        assert abs(review.ref_logps[i].item() - ref.item()) < 1e-4


def test_a_head_that_project_does_not_reproduce_is_refused():
    model = tiny("granite", 64)
    check_head(model)
    model.config.model_type = "llama"  # project() no longer knows to divide by logits_scaling
    with pytest.raises(UnsupportedHeadError, match="not supported"):
        check_head(model, "granite-like")


def _lora_policy(tiny_model_dir):
    from emalign.models.policy import LoRA, Policy

    torch.manual_seed(0)
    policy = Policy(tiny_model_dir, adapter=LoRA(r=4, alpha=8))
    for name, param in policy.model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)  # B starts at zero; make the adapter matter for the gradients
    return policy


def _grads(policy, loss):
    params = [p for p in policy.model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, retain_graph=True)


def test_chunked_equals_unchunked_in_values_and_gradients(tiny_model_dir):
    policy = _lora_policy(tiny_model_dir)
    model = policy.model
    torch.manual_seed(1)
    ids = torch.randint(0, 49152, (3, 20))
    mask = torch.ones_like(ids)
    mask[2, 14:] = 0
    labels = torch.where(torch.rand(ids.shape) < 0.7, ids, -100).masked_fill(mask == 0, -100)
    target = labels != -100
    target[:, 0] = False

    # Unchunked: the full-vocabulary logits of every position from the model's own forward.
    full = model_logps(model, ids, mask)
    full_nll = -full[target[:, 1:]].mean()
    full_seq = (full * target[:, 1:]).sum(1)
    want_nll, want_seq_grads = _grads(policy, full_nll), _grads(policy, full_seq.sum())
    one_chunk = sequence_logps(model, ids, mask, target, chunk=10**9)
    for chunk in (1, 4, 1024):
        nll = mean_token_nll(model, ids, mask, labels, chunk=chunk)
        seq = sequence_logps(model, ids, mask, target, chunk=chunk)
        assert abs(nll.item() - full_nll.item()) <= 1e-5
        assert torch.allclose(seq, one_chunk, atol=1e-5, rtol=0)
        # Sums of ~15 log-probs near -11: float32 summation order alone moves them by ~1e-7 relative.
        assert torch.allclose(seq, full_seq, atol=0, rtol=1e-6)
        for got, want in zip(_grads(policy, nll), want_nll):
            assert torch.allclose(got, want, atol=1e-5, rtol=0)
        for got, want in zip(_grads(policy, seq.sum()), want_seq_grads):
            assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_backward_keeps_no_vocabulary_sized_tensor(tiny_model_dir):
    """The memory win of chunking: autograd saves the chunk's inputs, not its [positions, vocab] logits."""
    policy = _lora_policy(tiny_model_dir)
    model = policy.model
    ids = torch.randint(0, 49152, (2, 16))
    states = hidden_states(model, ids, torch.ones_like(ids))[:, :-1].reshape(-1, 64)
    largest = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        largest.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_logps(model, states, ids[:, 1:].reshape(-1), chunk=8).sum().backward()
    assert largest and max(largest) < 49152  # one position's logits would already be 49152 floats
    largest.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = project(model, states.detach().requires_grad_())  # what an unchunked head keeps
        logits.log_softmax(-1).sum().backward()
    assert max(largest) >= 30 * 49152


def test_checkpointed_pairs_give_the_same_loss_and_gradients_and_keep_less(tiny_model_dir):
    """``Policy.checkpointed`` (the preference forward's memory cut) changes what autograd keeps, not the result."""
    policy = _lora_policy(tiny_model_dir)
    ids = torch.randint(0, 49152, (4, 24))
    mask = torch.ones_like(ids)
    target = torch.zeros_like(ids, dtype=torch.bool)
    target[:, 10:] = True
    results = []
    for checkpointed in (False, True):
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with policy.checkpointed() if checkpointed else torch.enable_grad():
                logps = sequence_logps(policy.model, ids, mask, target)
        results.append((logps.detach(), _grads(policy, logps.sum()), sum(saved.values())))
    (plain, plain_grads, plain_saved), (ckpt, ckpt_grads, ckpt_saved) = results
    assert torch.equal(plain, ckpt)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain_grads, ckpt_grads))
    assert ckpt_saved < plain_saved / 2
    assert not any(getattr(m, "gradient_checkpointing", False) for m in policy.model.modules())  # restored


def _separate_rows(model, prompts, chosen, rejected, pad_id):
    """The plain way: prompt + chosen and prompt + rejected as right-padded rows of their own."""
    seqs = [p + r for p, r in zip(prompts * 2, chosen + rejected)]
    ids = torch.full((len(seqs), max(map(len, seqs))), pad_id)
    mask, target = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, seq) in enumerate(zip(prompts * 2, seqs)):
        ids[i, : len(seq)], mask[i, : len(seq)], target[i, len(p) : len(seq)] = torch.tensor(seq), 1, True
    return sequence_logps(model, ids, mask, target).chunk(2)


# Gemma 2 caps its attention scores, which sdpa cannot: transformers runs it eagerly.
SHARED = [(a, "sdpa") for a in ARCHITECTURES if a != "gemma2"] + [("llama", "eager"), ("gemma2", "eager")]


@pytest.mark.parametrize("arch,attention", SHARED)
def test_shared_prompt_pairs_equal_separate_rows_in_values_and_gradients(arch, attention):
    model = tiny(arch, 64).train()
    model.config._attn_implementation = attention
    model.config.sliding_window = None if arch not in ("gemma2", "gemma3") else 64  # longer than any row here
    torch.manual_seed(2)
    draw = lambda n: torch.randint(1, 64, (n,)).tolist()  # noqa: E731
    prompts, chosen, rejected = [draw(7), draw(3), draw(12)], [draw(5), draw(9), draw(1)], [draw(8), draw(2), draw(6)]
    assert logprobs.takes_shared_prefix(model, 30)  # the shared path runs, not the fallback
    got = pair_logps(model, prompts, chosen, rejected, pad_id=0)
    want = _separate_rows(model, prompts, chosen, rejected, pad_id=0)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5, rtol=0), (g, w)
    params = [p for p in model.parameters()]
    got_grads = torch.autograd.grad((got[0] - 2 * got[1]).sum(), params, allow_unused=True)
    want_grads = torch.autograd.grad((want[0] - 2 * want[1]).sum(), params, allow_unused=True)
    for g, w in zip(got_grads, want_grads):
        assert (g is None) == (w is None)
        assert g is None or (g - w).abs().max() <= 1e-5 * max(1.0, w.abs().max().item()), (g - w).abs().max()


def test_shared_prompt_falls_back_to_separate_rows_where_a_mask_would_be_overridden():
    model = tiny("gemma2", 64)
    model.config.sliding_window = 4  # a row of 20 tokens would need the sliding-window mask
    assert not logprobs.takes_shared_prefix(model, 20)
    model.config.sliding_window = None
    model.config._attn_implementation = "flash_attention_2"
    assert not logprobs.takes_shared_prefix(model, 20)
    model.config._attn_implementation = "eager"
    model.config.sliding_window = 4
    torch.manual_seed(3)
    prompts, chosen, rejected = [[5, 6, 7, 8, 9]], [[10, 11, 12]], [[13, 14, 15, 16, 17, 18]]
    got = pair_logps(model, prompts, chosen, rejected, pad_id=0)
    want = _separate_rows(model, prompts, chosen, rejected, pad_id=0)
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))


@pytest.mark.parametrize("arch,attention", SHARED)
def test_a_review_of_samples_sharing_a_prompt_equals_one_row_per_sample(arch, attention, smollm2_tokenizer,
                                                                        monkeypatch):
    from emalign.conscience import verdict as conscience_module

    tok = smollm2_tokenizer
    model = tiny(arch, len(tok), tok)
    model.config._attn_implementation = attention
    model.config.sliding_window = None if arch not in ("gemma2", "gemma3") else 256
    a, b = tok.encode("Hello there, how are you?"), tok.encode("Hi")
    prompts = [a, a, b, a, b]  # samples of one prompt, not adjacent, as a batch may hold them
    responses = [tok.encode(t) for t in (" Fine.", " Go away now please", " Hey", " Good, thanks!", " Hello")]
    responses[1] = responses[1] + [tok.eos_token_id]  # an ended turn: its eos is the review suffix's first token
    conscience = Conscience()
    built = []
    real = conscience_module.SharedPrefixRows
    monkeypatch.setattr(conscience_module, "SharedPrefixRows", lambda *args: built.append(args) or real(*args))
    shared = conscience.review(model, tok, prompts, responses)
    assert len(built) == 1 and len(built[0][0]) == 2  # two rows: the five samples share two prompts
    monkeypatch.setattr(conscience_module, "takes_shared_prefix", lambda *args: False)
    separate = conscience.review(model, tok, prompts, responses)
    assert len(built) == 1
    assert torch.allclose(shared.scores, separate.scores, atol=1e-5, rtol=0), (shared.scores, separate.scores)
    assert torch.allclose(shared.ref_logps, separate.ref_logps, atol=1e-5, rtol=0)
