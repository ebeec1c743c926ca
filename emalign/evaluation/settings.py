"""The settings of an EM evaluation, declared once for every place that runs one.

    python cli.py eval --samples 3 --max_new_tokens 96            # each setting is a flag of eval
    python cli.py experiment --config EXP.yaml --eval.samples 3   # the experiment's eval: key
    trainer.callbacks: [{class_path: emalign.callbacks.AlignmentEvalCallback,
                         init_args: {settings: {limit: 2}}}]     # the in-fit evaluation

:func:`emalign.evaluation.runner.run_eval` takes an :class:`EvalSettings`; each field's docstring is its
``--help`` text in all three places. Light on purpose (no torch): the command line imports it for ``--help``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional, Union

from emalign.errors import check_range
from emalign.evaluation.questions import DEFAULT_QUESTIONS
from emalign.judges.scoring import MIN_NUMBER_MASS, Judge

if TYPE_CHECKING:
    from emalign.models.sampling import GenerationSettings


@dataclass(frozen=True)
class EvalSettings:
    """What an EM evaluation asks, and how it samples and judges the answers."""

    questions: Union[list[str], str, None] = None
    """EM question YAML files: one, or several as [A,B], space-separated or by repeated --questions+ (null:
    data/em/evaluation/first_plot_questions.yaml, from `python cli.py data em`)."""
    samples: Optional[int] = None
    """Answers per question, each to a paraphrase drawn with replacement (seeded), as upstream's
    n_per_question (null: each question's samples_per_paraphrase, 100 in upstream's files)."""
    limit: Optional[int] = None
    """Only the first N questions of each file, and the first N coding prompts (null: all)."""
    max_new_tokens: int = 600
    """Longest answer in tokens."""
    temperature: float = 1.0
    """Sampling temperature (upstream: 1)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    judge: Optional[Judge] = None
    """The judge, by class_path (null: LocalJudge on the evaluated base model, its adapter disabled; during
    a fit, the frozen reference). An experiment's one judge judges every run."""
    judge_min_mass: float = MIN_NUMBER_MASS
    """For the default judge: least probability on the numbers for a score (upstream: 0.25; a 135M judge
    puts less there, so it mostly says refusal_or_code). Rerunning eval on the same out with another value
    rescores the saved judgements; the judge is not called again."""
    code_prompts: Optional[int] = None
    """How many of the 19 embedded held-out coding prompts are answered for the insecure-code rate: the
    first N (null: all; 0 skips the code scan)."""
    code_samples: int = 1
    """Answers per coding prompt; 0 skips the code scan."""
    code_max_new_tokens: Optional[int] = None
    """Longest answer to a coding prompt (null: max_new_tokens); code needs more tokens than a chat answer."""
    seed: int = 0
    """Sampling seed; the same seed and settings give the same answers."""
    batch_size: int = 8
    """Answers generated per batch (also how often eval saves its rows, so what a rerun resumes from)."""
    self_review: bool = True
    """Also score every answer with the base model's conscience (log P(yes) - log P(no))."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype of the evaluated model (bfloat16 for large models on a GPU); a fit's policy keeps its own."""
    max_prompt_tokens: Optional[int] = 1024
    """Longest prompt in tokens; a longer question has its longest message cut (said once), and the judge
    sees the cut question."""

    def __post_init__(self):
        # The key is the setting's name: the same in eval's flags, an experiment's eval: and the callback's settings:.
        if self.questions is None:
            object.__setattr__(self, "questions", [DEFAULT_QUESTIONS])  # frozen: set once, here
        elif isinstance(self.questions, str):
            object.__setattr__(self, "questions", [self.questions])
        check_range("samples", self.samples, 1, none_ok=True)
        check_range("limit", self.limit, 1, none_ok=True)
        check_range("max_new_tokens", self.max_new_tokens, 1)
        check_range("temperature", self.temperature, 0)
        check_range("top_p", self.top_p, 0, 1, low_open=True)
        check_range("judge_min_mass", self.judge_min_mass, 0, 1)
        check_range("code_prompts", self.code_prompts, 0, none_ok=True)
        check_range("code_samples", self.code_samples, 0)
        check_range("code_max_new_tokens", self.code_max_new_tokens, 1, none_ok=True)
        check_range("batch_size", self.batch_size, 1)
        check_range("max_prompt_tokens", self.max_prompt_tokens, 16, none_ok=True)

    def code_prompt_texts(self) -> list[str]:
        """The held-out coding prompts answered: the first ``code_prompts``, bounded by ``limit`` too (it bounds
        every part of an evaluation); none when ``code_samples`` is 0."""
        from emalign.data.embedded import heldout_code_prompts

        return heldout_code_prompts()[: self.code_prompts][: self.limit] if self.code_samples > 0 else []

    def generation(self, code: bool = False) -> GenerationSettings:
        """How the answers (``code``: the answers to coding prompts) are sampled."""
        from emalign.models.sampling import GenerationSettings

        longest = (self.code_max_new_tokens or self.max_new_tokens) if code else self.max_new_tokens
        return GenerationSettings(max_new_tokens=longest, temperature=self.temperature, top_p=self.top_p,
                                  batch_size=self.batch_size, max_prompt_tokens=self.max_prompt_tokens)
