"""Batched, seeded sampling from a chat model.

Every sample has its own seed derived from ``(seed, step, prompt index, sample index)``, so a rerun
reproduces the same rollouts whatever else shares the batch. Each row draws its token by inverse
CDF from the temperature/top-p-warped distribution with one uniform number from its own
``torch.Generator`` (a logits processor that leaves only that token finite, so greedy decoding picks
it), inside one batched ``model.generate`` with KV cache. One random number per row and token, not
one per vocabulary entry as Gumbel-max needs (measured in bench/README.md, "Answered probes: optimisations").

    prompt_ids = [render_prompt(tokenizer, [{"role": "user", "content": "hi"}])]
    rollouts = sample_ids(model, tokenizer, prompt_ids, GenerationSettings(), num_samples=4)
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from emalign.errors import check_range
from emalign.models.logprobs import pad_right
from emalign.models.merge import merged_adapter
from emalign.records import Rollout
from emalign.seeds import sample_seed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """How rollouts are sampled."""

    max_new_tokens: int = 64
    """Upper bound on generated tokens per sample; generation stops at end-of-turn before that."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    batch_size: int = 16
    """Sequences per ``generate`` call (prompts x samples); halved automatically on out-of-memory."""
    max_prompt_tokens: Optional[int] = 1024
    """Longest prompt in tokens: a longer one has its longest message cut (the start kept), reported
    once. Without it one pasted 50,000-character message makes generation and review take far more memory
    (bench/README.md, "prompt bound")."""
    cpu_threads: Optional[int] = None
    """Torch intra-op threads while decoding on CPU (``None``: the process's). For a machine shared
    with other jobs: there a descheduled thread stalls every one of decoding's many small ops. On a
    quiet machine fewer threads decode more slowly, so the default keeps the process's (measured in
    bench/README.md, "Answered probes: optimisations")."""
    merge_lora: bool = False
    """Decode through each LoRA layer merged into one linear (``emalign.models.merge``; the same tokens, to float
    rounding), for a transient copy of the adapted weights: fewer products per call, so faster decoding on
    CPU (measured in bench/README.md, "Answered probes: sampling weights"). 4-bit layers and sharded models
    decode as they are."""
    share_prefill: bool = True
    """With several samples per prompt, run each prompt through the model once and give its samples copies
    of its KV cache (``_shared_prefill``), instead of one prefill per sample. The same model to float
    rounding (a batch of prompts rounds differently from a batch of samples), so a token sampled right at a
    boundary can flip. The saving grows with prompt length and samples per prompt; on short prompts it is
    lost in noise (measured in bench/README.md, "Answered probes: optimisations")."""

    def __post_init__(self):
        check_range("generation.max_new_tokens", self.max_new_tokens, 1)
        check_range("generation.temperature", self.temperature, 0)
        check_range("generation.top_p", self.top_p, 0, 1, low_open=True)
        check_range("generation.batch_size", self.batch_size, 1)
        check_range("generation.max_prompt_tokens", self.max_prompt_tokens, 16, none_ok=True)
        check_range("generation.cpu_threads", self.cpu_threads, 1, none_ok=True)


MODERATE_SAMPLING = {"temperature": 0.7, "top_p": 0.9}
"""Sampling for a model whose generation_config recommends none: varied, but rarely off the rails."""


def recommended_sampling(model) -> dict[str, float]:
    """``temperature`` and ``top_p`` from the model's ``generation_config`` where it sets them
    (its authors' recommendation), else ``MODERATE_SAMPLING``."""
    config = getattr(model, "generation_config", None)
    given = config.to_diff_dict() if config is not None else {}  # only what differs from HF's defaults
    return {key: float(given.get(key, value)) for key, value in MODERATE_SAMPLING.items()}


def render_prompt(tokenizer, messages: list[dict[str, str]], max_tokens: Optional[int] = None) -> list[int]:
    """The chat-templated prompt's ids, at most ``max_tokens`` long (the longest message cut to fit)."""
    return _fit(tokenizer, messages, max_tokens)[1]


def encode(tokenizer, text: str) -> list[int]:
    """The ids of ``text`` as it stands, no special tokens added: how every prompt, answer and question suffix
    is tokenised (a BOS in the middle of a conversation would change what the model reads)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    return encode(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def cut_messages(tokenizer, messages: list[dict[str, str]], max_tokens: Optional[int]) -> list[dict[str, str]]:
    """``messages`` whose rendered prompt fits ``max_tokens``: the longest message is cut (its start kept)
    until it does; the first cut of the process is reported once. Raises ``ValueError`` when the chat
    template alone is longer than ``max_tokens``."""
    return _fit(tokenizer, messages, max_tokens)[0]


def _fit(tokenizer, messages: list[dict[str, str]], max_tokens: Optional[int]) -> tuple[list[dict], list[int]]:
    """(messages cut to fit ``max_tokens``, their rendered ids): one render when they fit already."""
    ids = _render(tokenizer, messages)
    if max_tokens is None or len(ids) <= max_tokens:
        return messages, ids
    full = len(ids)
    messages = [dict(m) for m in messages]
    while len(ids) > max_tokens:
        contents = [encode(tokenizer, m["content"]) for m in messages]
        longest = max(range(len(messages)), key=lambda i: len(contents[i]))
        if not contents[longest]:
            raise ValueError(
                f"the chat template alone takes {len(ids)} tokens, more than max_prompt_tokens={max_tokens}"
            )
        keep = max(0, len(contents[longest]) - (len(ids) - max_tokens) - 8)  # 8: re-tokenising may merge or split
        messages[longest]["content"] = tokenizer.decode(contents[longest][:keep])
        ids = _render(tokenizer, messages)
    global _reported_cut
    if not _reported_cut:
        _reported_cut = True
        log.warning("a prompt of %d tokens was cut to max_prompt_tokens=%d (the start of its longest message kept); "
                    "later cuts are not reported", full, max_tokens)
    return messages, ids


_reported_cut = False


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


class SeededSampler:
    """Logits processor: warp, then pick each row's token by inverse CDF with one uniform from that row's generator.

    The returned scores are -inf everywhere but at the picked token, so greedy decoding takes it. The
    search runs in two levels (blocks of ``BLOCK`` tokens, then within the block), with sums in
    float64, so it allocates nothing vocabulary-sized beyond the warped scores themselves.
    """

    BLOCK = 256

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: torch.device) -> None:
        self.generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p
        self.device = device

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature  # a new tensor: modified in place below
        if self.top_p < 1.0:
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            cumulative = sorted_scores.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_scores.softmax(-1) > self.top_p  # keep the token that crosses top_p
            scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        rows, vocab = scores.shape
        exact = torch.float32 if scores.device.type == "mps" else torch.float64  # MPS has no float64
        weights = scores.sub_(scores.amax(-1, keepdim=True)).exp_()  # unnormalised probabilities; -inf -> 0
        pad = (-vocab) % self.BLOCK
        blocks = (torch.nn.functional.pad(weights, (0, pad)) if pad else weights).view(rows, -1, self.BLOCK)
        block_cdf = blocks.sum(-1, dtype=exact).cumsum_(-1)
        total = block_cdf[:, -1:]
        uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])
        uniform = uniform.to(device=block_cdf.device, dtype=exact).unsqueeze(-1)
        # Targets stay strictly below each cumulative total, and right=True takes the first entry that
        # exceeds the target, so a zero-probability token (masked, padding) is never picked.
        target = torch.minimum(uniform * total, total * (1 - 1e-12))
        block = torch.searchsorted(block_cdf, target, right=True).clamp_max(block_cdf.shape[-1] - 1)
        before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp_min(0)), 0.0)
        inner = blocks.gather(1, block.unsqueeze(-1).expand(-1, -1, self.BLOCK)).squeeze(1).cumsum(-1, dtype=exact)
        rest = torch.minimum((target - before).clamp_min(0.0), inner[:, -1:] * (1 - 1e-12))
        picked = (block * self.BLOCK + torch.searchsorted(inner, rest, right=True)).clamp_max(vocab - 1)
        return weights.fill_(float("-inf")).scatter_(-1, picked, 0.0)


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with pads on the left, so that every row's next token is the last column."""
    ids, mask = pad_right([p[::-1] for p in prompts], pad_id, device)
    return ids.flip(-1), mask.flip(-1)


@torch.no_grad()
def sample_ids(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    settings: GenerationSettings,
    num_samples: int = 1,
    seed: int = 0,
    step: int = 0,
    index_offset: int = 0,
) -> list[Rollout]:
    """Sample ``num_samples`` answers per tokenised prompt; rollouts come back prompt-major."""
    device = next(model.parameters()).device
    eos = eos_token_ids(model, tokenizer)
    rollouts: list[Rollout] = []
    batch_size = max(settings.batch_size, num_samples)
    start = 0
    merged = merged_adapter(model) if settings.merge_lora else nullcontext()
    with _threads(settings.cpu_threads if device.type == "cpu" else None), merged:
        while start < len(prompt_ids):
            per_call = max(1, batch_size // num_samples)
            chunk = prompt_ids[start : start + per_call]
            try:
                rollouts += _generate_chunk(
                    model, tokenizer, chunk, start + index_offset, settings, num_samples, seed, step, eos, device
                )
            except torch.OutOfMemoryError:
                if batch_size <= num_samples and per_call == 1:
                    raise
                batch_size = max(num_samples, batch_size // 2)
                log.warning("out of memory while generating; retrying with generation batch %d", batch_size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            start += len(chunk)
    return rollouts


@contextmanager
def _threads(count: Optional[int]) -> Iterator[None]:
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _generate_chunk(model, tokenizer, chunk, first_index, settings, num_samples, seed, step, eos, device):
    from transformers import LogitsProcessorList

    # Rows are repeated here rather than with num_return_sequences (HF expands before its prefill, and greedy
    # decoding over our per-row seeded sampler refuses that flag); _shared_prefill runs each prompt once instead.
    ids, mask = _left_pad([p for p in chunk for _ in range(num_samples)], tokenizer.pad_token_id, device)
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        use_cache=True,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    from emalign.models.sharding import is_sharded  # here: sharding imports Lightning, which inference does not need

    if is_sharded(model):  # under FSDP each step is collective: keep stepping until every rank is done
        kwargs["synced_gpus"] = True
    if num_samples > 1 and settings.share_prefill and min(map(len, chunk)) > 1:
        kwargs["cache"] = _shared_prefill(model, chunk, num_samples, tokenizer.pad_token_id, device)
    if settings.temperature > 0:
        seeds = [sample_seed(seed, step, first_index + i, k) for i in range(len(chunk)) for k in range(num_samples)]
        sampler = SeededSampler(seeds, settings.temperature, settings.top_p, device)
        kwargs["logits_processor"] = LogitsProcessorList([sampler])
    out = model.generate(**kwargs)[:, ids.shape[1] :].tolist()
    rollouts = []
    for row, tokens in enumerate(out):
        i, k = divmod(row, num_samples)
        cut = next((t + 1 for t, tok in enumerate(tokens) if tok in eos), None)
        response = tokens[:cut] if cut else tokens
        text = tokenizer.decode(response, skip_special_tokens=True)
        rollouts.append(Rollout(first_index + i, k, list(chunk[i]), response, text, cut is not None))
    return rollouts


def _shared_prefill(model, prompts: list[list[int]], num_samples: int, pad_id: int, device):
    """The KV cache of every prompt but its last token, computed once per prompt, each row repeated
    ``num_samples`` times: ``generate`` then runs only the last prompt token of each row before decoding.

    The rows are left-padded as ``_generate_chunk``'s are (one column shorter, the same pads), and the
    positions are those ``generate`` derives from the attention mask, so the cache is the one its own
    prefill of the repeated rows would have built."""
    ids, mask = _left_pad([p[:-1] for p in prompts], pad_id, device)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1).cache
    cache.batch_repeat_interleave(num_samples)
    return cache
