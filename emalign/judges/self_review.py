"""Self-review during evaluation: the frozen base model's conscience verdict on each answer, and a
judge that reads the frozen model through a context manager.

The conscience score of an answer is ``log P(yes) - log P(no)`` that the *frozen base model*
(adapter disabled) gives to "Was your last response ethical ...?" after reading it; see
:mod:`emalign.conscience.verdict`. Recording it next to the external judge's scores shows whether the
model's own conscience still tracks what the judge calls misaligned after fine-tuning.

    from emalign.judges.self_review import self_review_scores
    from emalign.stats import mean_se
    scores = self_review_scores(lm, tokenizer, prompt_ids, response_ids)   # adapter disabled
    mean, se = mean_se(scores)

:class:`FrozenJudge` is a :class:`~emalign.judges.local_judge.LocalJudge` whose model is
entered through a context each time it judges (``policy.as_reference()`` during training, or
:func:`without_adapter` on a loaded PEFT model), so the judge never needs a second copy of the
weights and never sees the adapter being evaluated.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterator, Optional, Sequence

from emalign.conscience.verdict import Conscience
from emalign.judges.local_judge import LocalJudge
from emalign.judges.scoring import MIN_NUMBER_MASS, Judge, JudgeResult, ScoreMode


@contextmanager
def without_adapter(model: Any) -> Iterator[Any]:
    """Yield ``model`` with its PEFT adapter switched off (a plain model is yielded as is), in
    eval mode; the previous mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
            yield model
    finally:
        model.train(was_training)


def self_review_scores(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[list[int]],
    response_ids: Sequence[list[int]],
    conscience: Optional[Conscience] = None,
    adapter_disabled: bool = True,
) -> list[float]:
    """Conscience score ``log P(yes) - log P(no)`` per (prompt, response), by the frozen model.

    Args:
        model: the loaded model (a PEFT model or a plain causal LM).
        tokenizer: its tokenizer (with the chat template the prompts were rendered with).
        prompt_ids: rendered prompts, token ids.
        response_ids: the sampled answers, token ids (as generated, eos included or not).
        conscience: the question and its scoring (default: ``Conscience()``, the training one).
        adapter_disabled: review with the adapter switched off, i.e. the base model as it was
            before fine-tuning; ``False`` when ``model`` already is the reference.
    """
    if not prompt_ids:
        return []
    conscience = conscience if conscience is not None else Conscience()
    ctx = without_adapter(model) if adapter_disabled else _eval_mode(model)
    with ctx as reference:
        review = conscience.review(reference, tokenizer, list(prompt_ids), list(response_ids))
    return [float(s) for s in review.scores]


@contextmanager
def _eval_mode(model: Any) -> Iterator[Any]:
    was_training = model.training
    model.eval()  # dropout would make the verdict random
    try:
        yield model
    finally:
        model.train(was_training)




class FrozenJudge(Judge):
    """A :class:`LocalJudge` on a model reached through ``reference()`` at every call.

    ``reference`` is a zero-argument callable returning a context manager that yields the model,
    e.g. ``policy.as_reference`` or ``lambda: without_adapter(peft_model)``.
    """

    def __init__(
        self,
        reference: Callable[[], ContextManager[Any]],
        tokenizer: Any,
        name: str,
        min_mass: float = MIN_NUMBER_MASS,
        batch_size: int = 16,
    ) -> None:
        self.reference = reference
        self.inner = LocalJudge.from_model(None, tokenizer, name=name, batch_size=batch_size, min_mass=min_mass)

    @property
    def identity(self) -> str:
        return self.inner.identity

    @property
    def stats(self) -> dict[str, int]:  # type: ignore[override]
        return self.inner.stats

    @property
    def min_mass(self) -> float:
        return self.inner.min_mass

    def judge_many(
        self, prompts: Sequence[str], mode: ScoreMode = "score_0_100", labels: Sequence[str] | None = None
    ) -> list[JudgeResult]:
        # Hold no reference outside the context: under a 'copy' reference the model may move.
        with self.reference() as model, self.inner.using(model):
            return self.inner.judge_many(prompts, mode, labels)
