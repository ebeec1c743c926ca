"""Evaluation on the Emergent Misalignment testbed (Betley et al. 2025, arXiv 2502.17424).

- :mod:`~emalign.evaluation.questions`: the upstream question YAML, expanded into items.
- :mod:`~emalign.evaluation.judges`: the local log-prob judge and the OpenAI-compatible judge.
- :mod:`~emalign.evaluation.metrics`: misalignment rate, means and shares as torchmetrics;
  :func:`summarize_samples` builds a run's summary.
- :mod:`~emalign.evaluation.report`: a self-contained HTML report.
- :mod:`~emalign.evaluation.discern`: how well the conscience tells labelled good answers from bad.
- :mod:`~emalign.evaluation.experiment`: a set of fits, each evaluated, compared in one report.

Judges and the report import torch/matplotlib/requests; they load on first use here, so that
``import emalign.evaluation`` stays cheap for code that only reads questions.
"""

from __future__ import annotations

import importlib
from typing import Any

from emalign.evaluation.questions import (
    EvalItem,
    Question,
    QuestionFileError,
    expand,
    load_questions,
)

_LAZY = {
    "Judge": "scoring",
    "JudgeResult": "scoring",
    "REFUSAL_OR_CODE": "scoring",
    "ScoreMode": "scoring",
    "aggregate_0_100": "scoring",
    "aggregate_labels": "scoring",
    "LocalJudge": "local_judge",
    "OpenAIJudge": "openai_judge",
    "JudgeAuthError": "openai_judge",
    "fill_template": "judges",
    "MisalignmentRate": "metrics",
    "MeanScore": "metrics",
    "ShareMetric": "metrics",
    "wilson_interval": "metrics",
    "summarize_samples": "metrics",
    "write_report": "report",
}

__all__ = [
    "EvalItem",
    "Question",
    "QuestionFileError",
    "expand",
    "load_questions",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"emalign.evaluation.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'emalign.evaluation' has no attribute {name!r}")
