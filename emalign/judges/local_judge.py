"""A judge that reads exact answer probabilities from a local causal LM.

An API judge sees only the first answer token, which is fine for GPT-4o (every number 0..100
is one token there) but wrong for tokenizers that split numbers: SmolLM2 writes "42" as "4",
"2". So this judge computes, for every candidate answer c (the strings "0".."100", or the
labels), the probability that the assistant turn *starts with exactly c*:

    P(c) = prod_j P(c_j | prompt, c_<j) * P(terminator | prompt, c)

where a terminator is any token that does not extend c (for numbers: does not start with a
digit, so EOS, end-of-turn, "." or a space all end the number; for labels: does not start with
an ASCII letter, digit or "_"). These events are disjoint for different numbers, so the
probabilities are exact and sum to at most 1. Candidates are tokenized canonically; other
spellings of the same number (e.g. "4"+"2" under a tokenizer that has "42") are not counted.

All candidates are scored in a few batched forwards: the prompt runs once, its KV cache is
copied to each candidate row, and the candidate tokens (at most 3 for numbers) run on top.
Models whose cache cannot be repeated fall back to batching full [prompt + candidate] rows.
"""

from __future__ import annotations

import copy
import re
import string
from contextlib import contextmanager
from typing import Any, Iterator, Literal, Sequence

import torch

from emalign.errors import check_range
from emalign.fence.models import loaded_from
from emalign.judges.scoring import (
    MIN_NUMBER_MASS, Judge, JudgeResult, ScoreMode, aggregate_0_100, aggregate_labels, check_mode,
)
from emalign.models.sampling import encode

ContinuationKind = Literal["digit", "word"]
"""Which next tokens extend a candidate: ``digit`` for numbers, ``word`` for labels."""

NUMBER_CANDIDATES: tuple[str, ...] = tuple(str(n) for n in range(101))

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_WORD_CHARS = frozenset(string.ascii_letters + string.digits + "_")
_DIGITS = frozenset(string.digits)


def _first_char(token: str | None) -> str:
    """First character a token's text starts with (SentencePiece byte tokens decoded)."""
    if not token:
        return ""
    m = _BYTE_TOKEN.fullmatch(token)
    return chr(int(m.group(1), 16)) if m else token[0]


KV_COPY_TOKENS = 4096
"""Prompt tokens the repeated KV cache of one candidate forward may hold (rows x prompt length): a typical
EM judge prompt (a few hundred tokens) keeps the full batch; a 1,000-token one takes 4 rows at a time."""


class LocalJudge(Judge):
    """Judge with a local Hugging Face causal LM (e.g. the frozen reference model).

    Build it from config (``model`` is anything ``emalign.models.policy.load_causal_lm`` accepts;
    loading is lazy) or wrap an already-loaded model with :meth:`from_model`.
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        adapter: str | None = None,
        batch_size: int = 16,
        dtype: str = "float32",
        device: str | None = None,
        use_cache: bool = True,
        min_mass: float = MIN_NUMBER_MASS,
        trust_remote_code: bool = False,
    ) -> None:
        """
        Args:
            model: model source (name, HF id or local directory) for the loader.
            adapter: optional PEFT adapter directory applied on top of ``model``.
            batch_size: candidate rows per forward (101 numbers -> 7 forwards at 16).
            dtype: weights dtype for loading (``float32``, ``bfloat16``, ...).
            device: where to put a model this judge loads; default CUDA when available.
            use_cache: run the prompt once and reuse its KV cache for every candidate.
            min_mass: below this total candidate probability there is no score/label.
            trust_remote_code: passed to the loader.
        """
        check_range("batch_size", batch_size, 1)
        check_range("min_mass", min_mass, 0, 1)
        self.model_source = model
        self.adapter = adapter
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = device
        self.use_cache = use_cache
        self.min_mass = min_mass
        self.trust_remote_code = trust_remote_code
        self._model: Any = None
        self._tokenizer: Any = None
        self._masks: dict[tuple[ContinuationKind, int], torch.Tensor] = {}
        self._name = model + (f"+{adapter}" if adapter else "")
        self.stats = {"requests": 0, "forwards": 0, "cached_forwards": 0}

    @classmethod
    def from_model(
        cls,
        model: Any,
        tokenizer: Any,
        *,
        name: str | None = None,
        batch_size: int = 16,
        use_cache: bool = True,
        min_mass: float = MIN_NUMBER_MASS,
    ) -> "LocalJudge":
        """Wrap a loaded model and tokenizer (the model stays where it is). ``model`` may be None when each
        use supplies it with :meth:`using` (``FrozenJudge``: a reference reached through a context manager)."""
        judge = cls(batch_size=batch_size, use_cache=use_cache, min_mass=min_mass)
        judge._model, judge._tokenizer = model, tokenizer
        cfg = getattr(model, "config", None)
        judge._name = name or loaded_from(cfg) or type(model).__name__
        return judge

    @contextmanager
    def using(self, model: Any) -> Iterator["LocalJudge"]:
        """Judge with ``model`` inside the block (one reached through a context manager, such as a frozen
        reference); no reference to it is kept after the block."""
        previous, self._model = self._model, model
        try:
            yield self
        finally:
            self._model = previous

    @property
    def identity(self) -> str:
        return f"local:{self._name}"

    # -- loading ---------------------------------------------------------------------------

    def _ensure_loaded(self) -> tuple[Any, Any]:
        if self._model is None:
            from emalign.models.policy import load_causal_lm, load_tokenizer  # heavy; only when used

            tok = load_tokenizer(self.model_source, trust_remote_code=self.trust_remote_code)
            model = load_causal_lm(
                self.model_source, dtype=self.dtype, trust_remote_code=self.trust_remote_code
            )
            if self.adapter:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, self.adapter)
            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            model.to(device).eval().requires_grad_(False)
            self._model, self._tokenizer = model, tok
        return self._model, self._tokenizer

    # -- probabilities ---------------------------------------------------------------------

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of the judge prompt as a user turn, ready for the assistant's answer."""
        _, tok = self._ensure_loaded()
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return encode(tok, text)
        return list(tok(prompt)["input_ids"])  # base models: the prompt as plain text

    def continuation_mask(self, kind: ContinuationKind, size: int) -> torch.Tensor:
        """Bool mask over the ``size`` output ids: True where a token would extend a candidate."""
        key = (kind, size)
        if key not in self._masks:
            _, tok = self._ensure_loaded()
            chars = _DIGITS if kind == "digit" else _WORD_CHARS
            n = min(len(tok), size)
            tokens = tok.convert_ids_to_tokens(list(range(n)))
            mask = torch.zeros(size, dtype=torch.bool)
            mask[:n] = torch.tensor([_first_char(t) in chars for t in tokens], dtype=torch.bool)
            self._masks[key] = mask
        return self._masks[key]

    @torch.no_grad()
    def candidate_logprobs(
        self, prompt: str, candidates: Sequence[str], kind: ContinuationKind
    ) -> torch.Tensor:
        """log P(answer starts with exactly c) for each candidate c (float64, in order)."""
        model, tok = self._ensure_loaded()
        cand_ids = [encode(tok, c) for c in candidates]
        if any(not ids for ids in cand_ids):
            raise ValueError("a judge candidate tokenizes to nothing")
        device = next(model.parameters()).device
        prompt_t = torch.tensor([self.prompt_ids(prompt)], device=device)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        was_training = model.training
        model.eval()  # dropout would make the judgement random
        try:
            cache, first = None, None
            if self.use_cache:
                out = model(input_ids=prompt_t, use_cache=True, logits_to_keep=1)  # only the next token's
                self.stats["forwards"] += 1
                cache = out.cache  # transformers 5's name, as everywhere (pyproject: >=5.24)
                if not hasattr(cache, "batch_repeat_interleave"):
                    cache = None  # not a repeatable cache: use the full-row fallback
                first = out.logits[0, -1]
            results = []
            # Each row of a chunk gets its own copy of the prompt's KV cache: bound the copies by tokens, so
            # that a long judge prompt takes a few rows per forward instead of batch_size copies of it.
            rows = min(self.batch_size, max(1, KV_COPY_TOKENS // prompt_t.shape[1])) if cache is not None else \
                self.batch_size
            for start in range(0, len(cand_ids), rows):
                chunk = cand_ids[start : start + rows]
                dists = self._chunk_dists(model, prompt_t, chunk, pad, cache, first)
                results.append(self._score_chunk(dists, chunk, kind))
            return torch.cat(results)
        finally:
            model.train(was_training)

    def _chunk_dists(
        self,
        model: Any,
        prompt_t: torch.Tensor,
        chunk: list[list[int]],
        pad: int,
        cache: Any,
        first: torch.Tensor | None,
    ) -> torch.Tensor:
        """Next-token logits (B, L+1, V): row i, position j is the distribution before token j
        of candidate i (j = its length: after the whole candidate, for the terminator)."""
        b, width, plen = len(chunk), max(len(c) for c in chunk), prompt_t.shape[1]
        # Right padding: pads sit after every real token, so causality keeps them invisible.
        ids = torch.full((b, width), pad, dtype=torch.long, device=prompt_t.device)
        for i, c in enumerate(chunk):
            ids[i, : len(c)] = torch.tensor(c, device=prompt_t.device)
        self.stats["forwards"] += 1
        if cache is not None and first is not None:
            rows = copy.deepcopy(cache)  # the forward appends to the cache in place
            rows.batch_repeat_interleave(b)
            self.stats["cached_forwards"] += 1
            mask = torch.ones((b, plen + width), dtype=torch.long, device=ids.device)
            logits = model(input_ids=ids, attention_mask=mask, cache=rows, use_cache=True).logits
            return torch.cat([first.expand(b, 1, -1), logits], dim=1)
        full = torch.cat([prompt_t.expand(b, -1), ids], dim=1)
        logits = model(input_ids=full, attention_mask=torch.ones_like(full)).logits
        return logits[:, plen - 1 :]

    def _score_chunk(
        self, dists: torch.Tensor, chunk: list[list[int]], kind: ContinuationKind
    ) -> torch.Tensor:
        logp = torch.log_softmax(dists.float(), dim=-1)
        cont = self.continuation_mask(kind, logp.shape[-1]).to(logp.device)
        # log P(next token extends the candidate), at every position; the terminator is the rest.
        log_cont = torch.logsumexp(logp.masked_fill(~cont, float("-inf")), dim=-1).double()
        # Gather every candidate's token log-probs at once (one device sync per chunk).
        width = logp.shape[1] - 1
        lengths = torch.tensor([len(c) for c in chunk], device=logp.device)
        tokens = torch.zeros((len(chunk), width), dtype=torch.long, device=logp.device)
        for i, c in enumerate(chunk):
            tokens[i, : len(c)] = torch.tensor(c, device=logp.device)
        picked = logp[:, :width].gather(-1, tokens.unsqueeze(-1)).squeeze(-1).double()
        valid = torch.arange(width, device=logp.device).unsqueeze(0) < lengths.unsqueeze(1)
        seq = picked.masked_fill(~valid, 0.0).sum(dim=1)
        p_cont = log_cont.gather(1, lengths.unsqueeze(1)).squeeze(1).exp().clamp(max=1.0)
        return (seq + torch.log1p(-p_cont)).cpu()

    def number_probs(self, prompt: str) -> dict[int, float]:
        """P(the answer is exactly n) for n = 0..100."""
        logps = self.candidate_logprobs(prompt, NUMBER_CANDIDATES, "digit")
        return {n: float(lp.exp()) for n, lp in enumerate(logps)}

    def label_probs(self, prompt: str, labels: Sequence[str]) -> dict[str, float]:
        """P(the answer is exactly the label) for each label."""
        logps = self.candidate_logprobs(prompt, list(labels), "word")
        return {lab: float(lp.exp()) for lab, lp in zip(labels, logps, strict=True)}

    # -- Judge -----------------------------------------------------------------------------

    def judge_many(
        self, prompts: Sequence[str], mode: ScoreMode = "score_0_100", labels: Sequence[str] | None = None
    ) -> list[JudgeResult]:
        check_mode(mode, labels)
        results = []
        for prompt in prompts:
            self.stats["requests"] += 1
            if mode == "score_0_100":
                results.append(aggregate_0_100(self.number_probs(prompt), self.min_mass))
            else:
                assert labels is not None
                results.append(aggregate_labels(self.label_probs(prompt, labels), labels, self.min_mass))
        return results
