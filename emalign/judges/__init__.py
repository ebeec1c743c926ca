"""Judges for the EM evaluation: the shared interface, the two implementations, and the helper
that fills an upstream judge prompt.

A judge is called with the filled prompt text, ``judge(prompt, mode, labels) -> JudgeResult``:

- :class:`~emalign.judges.local_judge.LocalJudge`: exact answer probabilities from a local
  causal LM (the frozen reference), numbers spanning several tokens included.
- :class:`~emalign.judges.openai_judge.OpenAIJudge`: an OpenAI-compatible endpoint's
  first-token top logprobs, as upstream used GPT-4o.

Both are importable from here, so a config can say ``class_path:
emalign.judges.LocalJudge``.
"""

from __future__ import annotations

from emalign.judges.local_judge import LocalJudge
from emalign.judges.openai_judge import JudgeAuthError, OpenAIJudge
from emalign.judges.scoring import (
    MIN_NUMBER_MASS,
    REFUSAL_OR_CODE,
    Judge,
    JudgeResult,
    ScoreMode,
    aggregate_0_100,
    aggregate_labels,
    labels_from_tokens,
    numbers_from_tokens,
)
from emalign.judges.self_review import FrozenJudge

__all__ = [
    "FrozenJudge",
    "MIN_NUMBER_MASS",
    "REFUSAL_OR_CODE",
    "Judge",
    "JudgeAuthError",
    "JudgeResult",
    "LocalJudge",
    "OpenAIJudge",
    "ScoreMode",
    "aggregate_0_100",
    "aggregate_labels",
    "fill_template",
    "labels_from_tokens",
    "numbers_from_tokens",
]


def fill_template(template: str, question: str, answer: str) -> str:
    """Fill ``{question}`` and ``{answer}`` as upstream did (``str.format``, so ``{{`` is a
    literal brace); braces inside the question or answer are left alone."""
    try:
        return template.format(question=question, answer=answer)
    except (KeyError, IndexError) as err:
        raise ValueError(f"judge prompt has an unknown field {{{err.args[0]}}}") from err
