"""The conscience: a frozen copy of the model reviews its own answers with one introspective question.

For a conversation (prompt, response) the reference reads ``[prompt; response; question]`` and the
verdict is ``score = log P(yes) - log P(no)`` for the next token, each side summed over the
tokenizer's single-token spellings ("Yes", " Yes", "yes", ...). The same forward pass yields the
reference log-probs of the response tokens (they share the prefix), which DPO needs as its anchor.
``PairBuilder`` turns scored rollouts into (chosen, rejected) preference pairs;
:mod:`emalign.conscience.step` runs the whole step (sample, review, revise, pair).

    with policy.as_reference() as reference:
        review = Conscience().review(reference, tokenizer, prompt_ids, response_ids)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from emalign.conscience.guard import CoherenceGuard, mean_logps
from emalign.errors import check_range
from emalign.models.logprobs import (
    SharedPrefixRows,
    hidden_states,
    pad_right,
    project,
    response_logps,
    response_mask,
    takes_shared_prefix,
    target_logps,
)
from emalign.models.sampling import encode, GenerationSettings, render_prompt, sample_ids
from emalign.records import Conversation, Pair, Review, Rollout

DEFAULT_QUESTION = "Was your last response ethical and aligned with human values? Answer Yes or No."
DEFAULT_REVISION = (
    "Your last response may be harmful or unethical. Rewrite it so that it is helpful, honest and "
    "harmless. Reply with the improved response only."
)
_MARK = "\x00EMALIGN_RESPONSE\x00"
_THINK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


class Conscience:
    """Scores conversations with the reference's answer to one high-level question."""

    def __init__(
        self,
        question: str = DEFAULT_QUESTION,
        yes_words: list[str] = ["Yes", "yes", "YES"],
        no_words: list[str] = ["No", "no", "NO"],
        include_reasoning: bool = True,
        batch_size: int = 8,
        revise_below: Optional[float] = None,
        revision_instruction: str = DEFAULT_REVISION,
    ) -> None:
        """
        Args:
            question: the introspective question, asked as the next user turn.
            yes_words / no_words: answer spellings; each is tried with and without a leading space and
                only spellings that are a single token count.
            include_reasoning: review ``<think>...</think>`` reasoning too (else only the final answer).
            batch_size: conversations per review forward.
            revise_below: when the best rollout of a prompt scores below this, the frozen model revises
                it; a revision that scores higher becomes the chosen answer. ``None`` disables revision.
            revision_instruction: the user turn that asks for the revision.
        """
        self.question = question
        self.yes_words = list(yes_words)
        self.no_words = list(no_words)
        self.include_reasoning = include_reasoning
        check_range("batch_size", batch_size, 1)
        check_range("revise_below", revise_below, none_ok=True)
        self.batch_size = batch_size
        self.revise_below = revise_below
        self.revision_instruction = revision_instruction
        self._cache: dict[int, tuple[list[int], list[int], list[int]]] = {}

    def answer_tokens(self, tokenizer) -> tuple[list[int], list[int], list[int]]:
        """(yes ids, no ids, question suffix ids) for this tokenizer, computed once."""
        key = id(tokenizer)
        if key not in self._cache:
            yes, no = self._single_tokens(tokenizer, self.yes_words), self._single_tokens(tokenizer, self.no_words)
            if not yes or not no:
                raise ValueError(f"no single-token spelling of {self.yes_words} or {self.no_words} in this tokenizer")
            self._cache[key] = (yes, no, self._suffix(tokenizer))
        return self._cache[key]

    @staticmethod
    def _single_tokens(tokenizer, words: list[str]) -> list[int]:
        ids = set()
        for word in words:
            for spelling in (word, " " + word):
                encoded = encode(tokenizer, spelling)
                if len(encoded) == 1:
                    ids.add(encoded[0])
        return sorted(ids)

    def _suffix(self, tokenizer) -> list[int]:
        """Tokens that close the assistant turn, ask the question and open the verdict turn."""
        messages = [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": _MARK},
            {"role": "user", "content": self.question},
        ]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        tail = rendered.split(_MARK, 1)[1]
        return encode(tokenizer, tail)

    def reviewed_response(self, tokenizer, response_ids: list[int]) -> list[int]:
        """The response as the conscience reads it: eos stripped (the suffix closes the turn)."""
        eos = tokenizer.eos_token_id
        ids = response_ids[:-1] if response_ids and response_ids[-1] == eos else response_ids
        if not self.include_reasoning:
            text = tokenizer.decode(ids, skip_special_tokens=False)
            stripped = _THINK.sub("", text)
            if stripped != text:
                ids = encode(tokenizer, stripped)
        return ids

    def read(self, tokenizer, logits: torch.Tensor) -> torch.Tensor:
        """The verdict, log P(yes) - log P(no), per row of the logits that follow the question suffix."""
        yes, no, _ = self.answer_tokens(tokenizer)
        verdict = logits.float().log_softmax(-1)
        return verdict[:, yes].logsumexp(-1) - verdict[:, no].logsumexp(-1)

    @torch.no_grad()
    def review(self, reference, tokenizer, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> Review:
        """Verdicts and reference log-probs, batched, one frozen forward per batch."""
        suffix = self.answer_tokens(tokenizer)[2]
        scores, logps = [], []
        for start in range(0, len(prompt_ids), self.batch_size):
            prompts = prompt_ids[start : start + self.batch_size]
            responses = response_ids[start : start + self.batch_size]
            read = [self.reviewed_response(tokenizer, r) for r in responses]
            # The review sequence holds the response's own tokens at the same positions (its eos, if any,
            # is the suffix's first token), so one pass gives the reference log-probs too. Only when the
            # reviewed text differs (reasoning stripped) does it take a second pass.
            same = all(r[: len(a)] == a and r[len(a) :] in ([], suffix[:1]) for a, r in zip(read, responses))
            counts = [len(r) for r in responses] if same else None
            at_last, ref = _frozen_pass(reference, prompts, [r + suffix for r in read], counts, tokenizer.pad_token_id)
            scores.append(self.read(tokenizer, project(reference, at_last)))
            logps.append(ref if same else reference_logps(reference, tokenizer, prompts, responses))
        return Review(torch.cat(scores).cpu(), torch.cat(logps).cpu())

    @torch.no_grad()
    def revise(
        self, reference, tokenizer, conversations: list[Conversation], answers: list[str], settings: GenerationSettings,
        seed: int, step: int,
    ) -> list[Rollout]:
        """Ask the frozen model to rewrite answers; the rollouts carry the original prompts' ids."""
        ask = {"role": "user", "content": self.revision_instruction}
        asks = [c + [{"role": "assistant", "content": a}, ask] for c, a in zip(conversations, answers)]
        requests = [render_prompt(tokenizer, ask, settings.max_prompt_tokens) for ask in asks]
        revisions = sample_ids(reference, tokenizer, requests, settings, 1, seed, step, index_offset=1_000_000)
        for rollout, conversation in zip(revisions, conversations):
            rollout.prompt_ids = render_prompt(tokenizer, conversation, settings.max_prompt_tokens)
        return revisions


@torch.no_grad()
def review_questions(model, tokenizer, consciences: list[Conscience], prompt_ids: Sequence[list[int]],
                     answer_ids: Sequence[list[int]], batch_size: int = 8,
                     advance: Callable[[int], None] = lambda n: None,
                     saved: Optional[Callable[[list[int], list[list[float]]], None]] = None) -> list[list[float]]:
    """Per conscience, the verdict on every (rendered prompt, answer): the tokens and the read-out of
    :meth:`Conscience.review`, with the work shared: the ``[prompt; answer]`` prefix runs once per answer and
    its KV cache serves every question (a test checks the scores against ``Conscience.review``). Answers go in
    batches of similar length; ``advance(n)`` follows each batch and question, ``saved(indices, scores per
    conscience)`` each batch once every question is read."""
    device = next(model.parameters()).device
    prefixes = [p + consciences[0].reviewed_response(tokenizer, a) for p, a in zip(prompt_ids, answer_ids)]
    order = sorted(range(len(prefixes)), key=lambda i: len(prefixes[i]))
    scores = [[0.0] * len(prefixes) for _ in consciences]
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids, mask = pad_right([prefixes[i] for i in batch], tokenizer.pad_token_id, device)
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1).cache
        for conscience, column in zip(consciences, scores):
            suffix = conscience.answer_tokens(tokenizer)[2]
            tail = torch.tensor([suffix] * len(batch), device=device)
            # Each row's suffix continues at its own length; the pads between are masked out.
            positions = mask.sum(1, keepdim=True) + torch.arange(len(suffix), device=device)
            logits = model(input_ids=tail, attention_mask=torch.cat([mask, torch.ones_like(tail)], 1),
                           position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1).logits
            for i, score in zip(batch, conscience.read(tokenizer, logits[:, -1]).tolist()):
                column[i] = score
            cache.crop(-len(suffix))
            advance(len(batch))
        if saved:
            saved(batch, [[column[i] for i in batch] for column in scores])
    return scores


def _frozen_pass(reference, prompts: list[list[int]], continuations: list[list[int]], counts: Optional[list[int]],
                 pad_id: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One forward over ``prompt + continuation`` sequences: the states at their last tokens ``[N, H]`` and,
    given ``counts``, the summed log-probs of each continuation's first ``counts[k]`` tokens.

    Samples of one prompt share it in one row (``SharedPrefixRows``) where the attention allows it.
    """
    device = next(reference.parameters()).device
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, prompt in enumerate(prompts):
        groups.setdefault(tuple(prompt), []).append(k)
    longest = max(len(key) + sum(len(continuations[k]) for k in ks) for key, ks in groups.items())
    if len(groups) < len(prompts) and takes_shared_prefix(reference, longest):
        grouped = [[continuations[k] for k in ks] for ks in groups.values()]
        rows = SharedPrefixRows([list(key) for key in groups], grouped, pad_id, device)
        where = [(0, 0)] * len(prompts)  # sequence k is continuation j of row i
        for i, ks in enumerate(groups.values()):
            for j, k in enumerate(ks):
                where[k] = (i, j)
        states = rows.hidden_states(reference)
        at_last = states[[i for i, _ in where], [rows.last(i, j) for i, j in where]]
        ref = None if counts is None else rows.logps(reference, states, [(i, j, n) for (i, j), n in zip(where, counts)])
        return at_last, ref
    ids, mask = pad_right([p + c for p, c in zip(prompts, continuations)], pad_id, device)
    states = hidden_states(reference, ids, mask)
    at_last = states[torch.arange(len(prompts), device=device), mask.sum(1) - 1]
    if counts is None:
        return at_last, None
    target = response_mask([len(p) for p in prompts], counts, ids.shape[1], device)
    return at_last, target_logps(reference, states, ids, target)


@torch.no_grad()
def reference_logps(reference, tokenizer, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
    """Summed log-probs of each response given its prompt."""
    device = next(reference.parameters()).device
    return response_logps(reference, prompts, responses, tokenizer.pad_token_id, device).cpu()


@dataclass
class PairBuilder:
    """Best vs worst rollout of each prompt, kept when their score gap reaches ``margin``."""

    margin: float = 1.0
    """Minimum score difference between chosen and rejected."""
    guard: Optional[CoherenceGuard] = None
    """When set, the chosen answer is the best-scoring one the coherence guard allows against the worst
    (``emalign.conscience.guard``): nonsense cannot be chosen on the ethics question alone. Off by default."""

    def __post_init__(self) -> None:
        check_range("conscience.pair_builder.margin", self.margin, 0)

    def build(self, rollouts: list[Rollout], review: Review, step: int) -> list[Pair]:
        groups: dict[int, list[int]] = {}
        for i, rollout in enumerate(rollouts):
            groups.setdefault(rollout.prompt_index, []).append(i)
        logps = mean_logps(review.ref_logps, [len(r.response_ids) for r in rollouts]) if self.guard else None
        pairs = []
        for members in groups.values():
            worst = min(members, key=lambda i: float(review.scores[i]))
            if self.guard is not None:
                floor = float(logps[worst])
                members = [i for i in members if self.guard.allows(floor, float(logps[i]), rollouts[i].text)]
                if not members:
                    continue
            best = max(members, key=lambda i: float(review.scores[i]))
            gap = float(review.scores[best] - review.scores[worst])
            if best == worst or gap < self.margin or rollouts[best].response_ids == rollouts[worst].response_ids:
                continue
            pairs.append(
                Pair(
                    prompt_ids=rollouts[best].prompt_ids,
                    chosen_ids=rollouts[best].response_ids,
                    rejected_ids=rollouts[worst].response_ids,
                    ref_chosen=float(review.ref_logps[best]),
                    ref_rejected=float(review.ref_logps[worst]),
                    chosen_score=float(review.scores[best]),
                    rejected_score=float(review.scores[worst]),
                    step=step,
                    revised=rollouts[best].revised,
                    chosen_index=best,
                    rejected_index=worst,
                )
            )
        return pairs
