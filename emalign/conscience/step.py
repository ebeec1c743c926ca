"""One conscience step: the policy samples, its frozen copy reviews, low answers are revised, pairs are built.

    runner = ConscienceStep(Conscience(revise_below=-1.0), PairBuilder(margin=1.0), GenerationSettings(), 2)
    result = runner.step(policy, conversations, step=12, seed=0)
    result.pairs  # each pair names its chosen and rejected rollouts by index in result.rollouts

It knows nothing of Lightning: ``ConscienceCallback`` schedules it and queues ``result.pairs``, and
:mod:`emalign.conscience.decoding` reuses :func:`revise_and_check`. Every verdict, revisions' included, goes
through ``Conscience.review``, so a subclass that overrides it changes all of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from emalign.conscience.verdict import Conscience, PairBuilder
from emalign.errors import SettingError, check_range
from emalign.models.sampling import GenerationSettings, render_prompt, sample_ids
from emalign.records import Conversation, Pair, Review, Rollout

Role = Literal["chosen", "rejected", "unpaired"]


def review_rollouts(conscience: Conscience, reviewer, tokenizer, rollouts: list[Rollout]) -> Review:
    """``conscience.review`` of rollouts (the one way every verdict here is made)."""
    return conscience.review(reviewer, tokenizer, [r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts])


@dataclass
class Revisions:
    """The frozen model's rewrites of some answers, with their verdicts."""

    rollouts: list[Rollout]
    review: Review
    better: list[bool]
    """Per rewrite: it scores higher than the answer it rewrites (the keep-if-higher rule)."""


def revise_and_check(
    conscience: Conscience, reviewer, tokenizer, conversations: list[Conversation], answers: list[str],
    scores: list[float], settings: GenerationSettings, seed: int, step: int,
) -> Revisions:
    """Rewrite each answer (given its conversation and score) with ``reviewer``, review the rewrites,
    and mark the ones that score higher than the answer they rewrite."""
    if not answers:
        return Revisions([], Review(torch.zeros(0), torch.zeros(0)), [])
    rewrites = conscience.revise(reviewer, tokenizer, conversations, answers, settings, seed, step)
    checked = review_rollouts(conscience, reviewer, tokenizer, rewrites)
    return Revisions(rewrites, checked, [float(new) > old for new, old in zip(checked.scores, scores)])


@dataclass
class StepResult:
    """What one conscience step made. ``review`` holds the verdicts of ``rollouts`` after revision."""

    step: int
    conversations: list[Conversation]
    rollouts: list[Rollout]
    review: Review
    pairs: list[Pair]
    revisions_kept: int
    gen_seconds: float

    def roles(self) -> list[Role]:
        """Each rollout's part in the pairs, in rollout order."""
        roles: list[Role] = ["unpaired"] * len(self.rollouts)
        for pair in self.pairs:
            roles[pair.chosen_index], roles[pair.rejected_index] = "chosen", "rejected"
        return roles

    def rows(self, run: str) -> list[dict[str, Any]]:
        """One row per rollout (``rollouts.jsonl``, the rollout tables): prompt, response, score, role in the pairs."""
        return [
            {"run": run, "step": self.step, "prompt": self.conversations[r.prompt_index][-1]["content"],
             "response": r.text, "score": round(score, 4), "role": role, "revised": r.revised}
            for r, score, role in zip(self.rollouts, self.review.scores.tolist(), self.roles())
        ]

    def stats(self) -> dict[str, float]:
        scores = self.review.scores
        tokens = sum(len(r.response_ids) for r in self.rollouts)
        return {
            "score_mean": float(scores.mean()),
            "approval_rate": float((scores > 0).float().mean()),
            "gen_tokens_per_s": tokens / self.gen_seconds if self.gen_seconds else 0.0,
            "revisions_kept": float(self.revisions_kept),
        }


class ConscienceStep:
    def __init__(
        self, conscience: Conscience, pair_builder: PairBuilder, generation: GenerationSettings, samples_per_prompt: int
    ) -> None:
        """
        Args:
            conscience: the question, its scoring and the revision rule (``revise_below``).
            pair_builder: how scored rollouts become pairs.
            generation: sampling settings for rollouts and revisions.
            samples_per_prompt: answers sampled per prompt (K >= 2 to form pairs).
        """
        check_range("samples_per_prompt", samples_per_prompt, 2)  # a pair needs two answers
        self.conscience, self.pair_builder, self.generation = conscience, pair_builder, generation
        self.samples_per_prompt = samples_per_prompt

    def check_prompt_room(self, tokenizer) -> None:
        """Fail now, in one line, if ``max_prompt_tokens`` leaves no room for a prompt in the chat template
        (else the first step, maybe hours into a fit, would fail cutting a prompt)."""
        bound = self.generation.max_prompt_tokens
        template = len(render_prompt(tokenizer, [{"role": "user", "content": ""}]))
        if bound is not None and template >= bound:
            raise SettingError(f"generation.max_prompt_tokens: the chat template alone takes {template} tokens, "
                               f"so {bound} leaves no room for a prompt; use at least {template + 16}")

    def step(self, policy, prompts: list[Conversation], step: int, seed: int = 0) -> StepResult:
        """Sample K answers per prompt with the policy, review them with its frozen reference, revise, pair."""
        tokenizer, settings = policy.tokenizer, self.generation
        prompt_ids = [render_prompt(tokenizer, c, settings.max_prompt_tokens) for c in prompts]
        start = time.perf_counter()
        with policy.generating() as model:
            rollouts = sample_ids(model, tokenizer, prompt_ids, settings, self.samples_per_prompt, seed, step)
        gen_seconds = time.perf_counter() - start
        with policy.as_reference() as reference:
            review = review_rollouts(self.conscience, reference, tokenizer, rollouts)
            rollouts, review, kept = self._revise(reference, tokenizer, prompts, rollouts, review, seed, step)
        pairs = self.pair_builder.build(rollouts, review, step)
        return StepResult(step, prompts, rollouts, review, pairs, kept, gen_seconds)

    def _revise(self, reference, tokenizer, prompts, rollouts, review, seed, step) -> tuple[list[Rollout], Review, int]:
        """Self-correction: a prompt's best rollout scoring below ``revise_below`` is replaced by the frozen
        model's rewrite when that scores higher. Returns new rollouts and review (the inputs are left as they were)."""
        threshold = self.conscience.revise_below
        if threshold is None:
            return rollouts, review, 0
        best: dict[int, int] = {}  # prompt -> its best rollout; the first of equal scores
        for i, r in enumerate(rollouts):
            if r.prompt_index not in best or review.scores[i] > review.scores[best[r.prompt_index]]:
                best[r.prompt_index] = i
        low = [i for i in best.values() if review.scores[i] < threshold]
        wanted = set(low)
        low += self._collective_padding(reference, list(best.values()), wanted)
        revisions = revise_and_check(
            self.conscience, reference, tokenizer, [prompts[rollouts[i].prompt_index] for i in low],
            [rollouts[i].text for i in low], [float(review.scores[i]) for i in low], self.generation, seed, step,
        )
        rollouts, scores, ref_logps = list(rollouts), review.scores.clone(), review.ref_logps.clone()
        kept = 0
        for n, (i, rewrite) in enumerate(zip(low, revisions.rollouts)):
            if i in wanted and revisions.better[n]:
                rewrite.prompt_index, rewrite.sample_index = rollouts[i].prompt_index, rollouts[i].sample_index
                rewrite.revised = True
                rollouts[i] = rewrite
                scores[i], ref_logps[i] = revisions.review.scores[n], revisions.review.ref_logps[n]
                kept += 1
        return rollouts, Review(scores, ref_logps), kept

    @staticmethod
    def _collective_padding(reference, best: list[int], wanted: set[int]) -> list[int]:
        """Under FSDP revising is collective: every rank revises as many as the busiest one, the extra
        rewrites (of answers above the threshold) made and thrown away."""
        from emalign.models.sharding import is_sharded, max_over_ranks  # sharding imports Lightning

        if not is_sharded(reference):
            return []
        extra = max_over_ranks(len(wanted), next(reference.parameters()).device) - len(wanted)
        return [i for i in best if i not in wanted][:extra]
