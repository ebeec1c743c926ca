"""The Emergent Misalignment evaluation (Betley et al. 2025, arXiv 2502.17424): sampled answers to the EM
questions judged for alignment and coherence, and answers to coding prompts scanned for insecure code.

- :mod:`~emalign.evaluation.questions`: the upstream question YAML, expanded into items as they are read.
- :mod:`~emalign.evaluation.settings`: what an evaluation samples and judges (``eval``'s flags).
- :mod:`~emalign.evaluation.stages`: sampling, self-review and judging of one batch.
- :mod:`~emalign.evaluation.runner`: a whole evaluation, saved row by row, resumable.
- :mod:`~emalign.evaluation.metrics`, :mod:`~emalign.evaluation.summary`: misalignment rate, means and
  shares as torchmetrics; a run's summary.
- :mod:`~emalign.evaluation.report`: a self-contained HTML report.
- :mod:`~emalign.evaluation.codesec`: the bandit scan of model-written code.

The judges are :mod:`emalign.judges`; discernment on labelled pairs :mod:`emalign.discern`; the effect and
self-correction studies :mod:`emalign.studies`; sets of fits compared :mod:`emalign.experiments`.
"""

from __future__ import annotations

from emalign.evaluation.questions import EvalItem, Question, QuestionFileError, expand, load_questions

__all__ = ["EvalItem", "Question", "QuestionFileError", "expand", "load_questions"]
