"""The conscience at inference (zero-shot): best-of-K answers picked by the model's own self-review.

For each conversation the model samples K answers; the same introspective question the fit uses
("Was your last response ethical ...? Yes/No") scores each one as ``log P(yes) - log P(no)``, and
the best is returned. There is no training here, so the model is its own frozen copy: it reviews
(and, if asked, revises) its own answers. With a fine-tuned adapter loaded, ``review_with="base"``
lets the base model (adapter disabled) be the conscience instead.

    from emalign.conscience.decoding import ConscienceDecoder
    from emalign.models.policy import load_for_inference
    model, tokenizer = load_for_inference("smollm2-135m-instruct")
    decoder = ConscienceDecoder(model, tokenizer, num_samples=4, threshold=0.0, on_low="revise")
    [answer] = decoder.answer([[{"role": "user", "content": "How do I make a quick buck?"}]])
    print(answer.action, answer.score, answer.text)

The threshold is a probability: the reviewer's P(yes) / (P(yes) + P(no)) on the question, i.e.
``sigmoid(score)``. By default (``threshold=None``) it is calibrated for the model in use: the
``calibration_quantile`` (10%) of the reviewer's own verdicts on a built-in reference set of plainly
benign answers (``resources/calibration.jsonl``: "The capital of France is Paris." and the like).
So an answer goes to ``on_low`` when the model trusts it less than 90% of those; a raw log-odds of
0 would not do, because small models' consciences are pessimistic (SmolLM2-135M puts P(yes) near
0.2 on plainly benign answers).

Rule when the best sample is below ``threshold`` (``on_low``):
``refuse``: return ``refusal_text``. ``keep``: return the best sample anyway.
``revise``: the conscience rewrites the best sample (``Conscience.revise``). The rewrite is returned
when it scores higher than the best sample and passes the coherence guard (``emalign.conscience.guard``: not
blank, and not far less likely per token under the reviewer than the best sample; incoherent text
can out-score a plain answer on the ethics question alone). Otherwise ``fallback`` decides: ``keep``
(the default; the best sample is returned as ``kept``) or ``refuse``.

From the shell: ``python cli.py generate --prompts FILE`` and ``python cli.py chat``.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Iterator, Literal, Optional

import torch

from emalign.conscience.guard import CoherenceGuard, mean_logps
from emalign.conscience.step import review_rollouts, revise_and_check
from emalign.conscience.verdict import Conscience
from emalign.errors import check_range
from emalign.models.sampling import encode, GenerationSettings, render_prompt, sample_ids
from emalign.records import Conversation, Review, Rollout

OnLow = Literal["revise", "refuse", "keep"]
Fallback = Literal["refuse", "keep"]
ReviewWith = Literal["self", "base"]
Action = Literal["best", "revised", "refused", "kept"]
DEFAULT_REFUSAL = "I can't help with that."


@dataclass
class Candidate:
    """One text the conscience scored."""

    text: str
    score: float
    finished: bool = True
    """False when the sample hit ``max_new_tokens`` before its end-of-turn token."""
    logp: float = 0.0
    """Mean log-prob per token of the text under the reviewer (what the coherence guard compares)."""


@dataclass
class Answer:
    """What the decoder returns for one conversation."""

    text: str
    """The answer shown to the user (a sample, a revision, or the refusal text)."""
    score: float
    """Conscience score of the text that was chosen: the best sample, or the revision when revised.
    For a refusal it is the score of the best sample that was rejected (the refusal is not reviewed)."""
    action: Action
    """``best``: best sample, at or above threshold. ``revised``: the rewrite won. ``refused``:
    refusal text. ``kept``: best sample returned although below threshold."""
    candidates: list[Candidate] = field(default_factory=list)
    """All K samples with their scores, in sampling order."""
    best_index: int = 0
    """Index of the best sample in ``candidates``."""
    revision: Optional[Candidate] = None
    """The rewrite, when one was asked for (whether or not it was used)."""

    @property
    def p_yes(self) -> float:
        """The verdict as a probability, P(yes) / (P(yes) + P(no)): what ``threshold`` compares."""
        return float(torch.sigmoid(torch.tensor(self.score)))

    def to_dict(self) -> dict:
        return {
            "answer": self.text,
            "score": self.score,
            "p_yes": self.p_yes,
            "action": self.action,
            "best_index": self.best_index,
            "candidates": [vars(c) for c in self.candidates],
            "revision": vars(self.revision) if self.revision else None,
        }


class ConscienceDecoder:
    """Samples K answers per conversation and returns the one the model's conscience rates best."""

    def __init__(
        self,
        model,
        tokenizer,
        conscience: Optional[Conscience] = None,
        settings: Optional[GenerationSettings] = None,
        num_samples: int = 4,
        threshold: Optional[float] = None,
        on_low: OnLow = "revise",
        fallback: Fallback = "keep",
        refusal_text: str = DEFAULT_REFUSAL,
        review_with: ReviewWith = "self",
        seed: int = 0,
        guard: Optional[CoherenceGuard] = CoherenceGuard(),
        calibration_quantile: float = 0.1,
    ) -> None:
        """
        Args:
            model: a causal LM (a ``PeftModel`` when an adapter is loaded), ideally in eval mode.
            tokenizer: its tokenizer, with a chat template and a pad token.
            conscience: the question and answer words (default: ``Conscience()``).
            settings: how answers (and revisions) are sampled.
            num_samples: K, answers sampled per conversation.
            threshold: a probability, P(yes) / (P(yes) + P(no)); a best answer below it triggers
                ``on_low``. ``None``: calibrated on the reference set (see the module docstring).
            on_low: what to do below threshold (see the module docstring).
            fallback: under ``on_low="revise"``, what to do when the rewrite does not score higher.
            refusal_text: the answer when refusing.
            review_with: ``self``: the loaded model (adapter on) reviews and revises; ``base``: the
                adapter is disabled for reviewing and revising. Without an adapter both are the same.
            seed: base seed; each sample's seed also depends on the step and prompt index.
            guard: the coherence guard a revision must pass to win; ``None`` lets the score alone decide.
            calibration_quantile: with ``threshold=None``, the quantile of the reference set's verdicts
                used as the threshold.
        """
        check_range("num_samples", num_samples, 1)
        check_range("threshold", threshold, 0, 1, none_ok=True)  # a probability, P(yes)
        check_range("calibration_quantile", calibration_quantile, 0, 1)
        self.model = model
        self.tokenizer = tokenizer
        self.conscience = conscience or Conscience()
        self.settings = settings or GenerationSettings()
        self.num_samples = num_samples
        self.threshold = threshold
        self.on_low = on_low
        self.fallback = fallback
        self.refusal_text = refusal_text
        self.review_with = review_with
        self.seed = seed
        self.guard = guard
        self.calibration_quantile = calibration_quantile

    @contextmanager
    def reviewer(self) -> Iterator[torch.nn.Module]:
        """The conscience's model: the model itself, or its base with the adapter disabled."""
        use_base = self.review_with == "base" and hasattr(self.model, "disable_adapter")
        with self.model.disable_adapter() if use_base else nullcontext():
            yield self.model

    @torch.no_grad()
    def answer(self, conversations: list[Conversation], step: int = 0, index_offset: int = 0) -> list[Answer]:
        """One ``Answer`` per conversation (each a list of chat messages ending with a user turn).

        ``step`` and ``index_offset`` only feed the per-sample seeds: a chat passes its turn number as
        ``step`` so each turn draws fresh noise, and a caller that splits prompts into batches passes
        the batch's first prompt index so the samples do not depend on how prompts were batched.
        """
        if not conversations:
            return []
        k = self.num_samples
        prompt_ids = [render_prompt(self.tokenizer, c, self.settings.max_prompt_tokens) for c in conversations]
        rollouts = sample_ids(self.model, self.tokenizer, prompt_ids, self.settings, k, self.seed, step, index_offset)
        with self.reviewer() as reviewer:
            review = review_rollouts(self.conscience, reviewer, self.tokenizer, rollouts)
        candidates = self._candidates(rollouts, review)
        answers = []
        for i in range(len(conversations)):
            group = candidates[i * k : (i + 1) * k]
            # max() keeps the first of equal scores, so ties go to the earliest sample.
            best = max(range(k), key=lambda j: group[j].score)
            answers.append(Answer(group[best].text, group[best].score, "best", group, best))
        threshold = self.calibrated_threshold()
        low = [i for i, a in enumerate(answers) if a.p_yes < threshold]
        if low and self.on_low == "revise":
            self._revise(conversations, answers, low, step)
        for i in low:
            answer = answers[i]
            if answer.action == "revised":
                continue
            rule = self.on_low if self.on_low != "revise" else self.fallback
            if rule == "refuse":
                answer.text, answer.action = self.refusal_text, "refused"
            else:
                answer.action = "kept"
        return answers

    def calibrated_threshold(self) -> float:
        """``threshold``, or (when None) the calibration quantile of the reviewer's P(yes) on plainly
        benign reference answers; computed once."""
        if self.threshold is None:
            from emalign.data.chat import read_chat_jsonl
            from emalign.data.embedded import RESOURCES

            references = read_chat_jsonl(RESOURCES / "calibration.jsonl")
            prompts = [render_prompt(self.tokenizer, c[:-1]) for c in references]
            answers = [encode(self.tokenizer, c[-1]["content"]) for c in references]
            with self.reviewer() as reviewer:
                scores = self.conscience.review(reviewer, self.tokenizer, prompts, answers).scores
            self.threshold = float(torch.quantile(torch.sigmoid(scores.double()), self.calibration_quantile))
        return self.threshold

    @staticmethod
    def _candidates(rollouts: list[Rollout], review: Review) -> list[Candidate]:
        logps = mean_logps(review.ref_logps, [len(r.response_ids) for r in rollouts])
        return [Candidate(r.text, float(s), r.finished, float(lp)) for r, s, lp in zip(rollouts, review.scores, logps)]

    def _revise(self, conversations: list[Conversation], answers: list[Answer], low: list[int], step: int) -> None:
        """Rewrite the low answers with the conscience's model; a rewrite wins when it scores higher (the
        keep-if-higher rule of :func:`emalign.conscience.step.revise_and_check`) and passes the coherence guard."""
        with self.reviewer() as reviewer:
            revisions = revise_and_check(
                self.conscience, reviewer, self.tokenizer, [conversations[i] for i in low],
                [answers[i].text for i in low], [answers[i].score for i in low], self.settings, self.seed, step,
            )
        candidates = self._candidates(revisions.rollouts, revisions.review)
        for i, revision, better in zip(low, candidates, revisions.better):
            answer = answers[i]
            answer.revision = revision
            best = answer.candidates[answer.best_index]
            coherent = self.guard is None or self.guard.allows(best.logp, revision.logp, revision.text)
            if better and coherent:
                answer.text, answer.score, answer.action = revision.text, revision.score, "revised"
