"""AlignmentEvalCallback: a small EM evaluation every N optimizer steps, to watch alignment move.

    trainer:
      callbacks:
        - class_path: emalign.callbacks.AlignmentEvalCallback
          init_args: {every_n_steps: 50, questions: [data/em/evaluation/first_plot_questions.yaml], limit: 4}

At step 0 (the model before fine-tuning), every N-th step and at the end of fit, rank 0 samples
answers with the policy (``policy.generating()``), has them judged (default: the frozen reference
through ``policy.as_reference()`` as a local judge, so no second copy of the weights), scores them
with the reference's conscience, and scans answers to held-out coding prompts with bandit. It logs
``eval/misalignment_rate``, ``eval/aligned_mean``, ``eval/coherent_mean``,
``eval/insecure_code_rate``, ``eval/self_review_mean`` (undefined values are not logged) to the
trainer's loggers and appends a row to ``{default_root_dir}/eval_history.jsonl`` (the answers go
to ``eval_samples.jsonl``), which the report plots as alignment over training.

The same seeds are used at every evaluation, so differences between steps come from the model,
not from the sampling noise. Other ranks do not wait for rank 0 here; under DDP they wait at the
next gradient sync. Under FSDP (``emalign.models.sharding.FSDP2``) every forward needs every rank, so
every rank runs the same evaluation (same seeds, same answers) and rank 0 alone records it; an
external judge is refused there at start (each rank would call it).
"""

from __future__ import annotations

import dataclasses

import logging
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L

from emalign.conscience.verdict import Conscience
from emalign.evaluation.questions import DEFAULT_QUESTIONS
from emalign.evaluation.runner import EvalError, load_items
from emalign.evaluation.stages import code_keys, code_rows, em_rows
from emalign.evaluation.summary import summarize_eval
from emalign.evaluation.scoring import MIN_NUMBER_MASS, Judge
from emalign.evaluation.self_review import FrozenJudge
from emalign.files import append_rows
from emalign.models.sampling import GenerationSettings
from emalign.models.sharding import EVAL_JUDGE_REASON, FSDP2, UnsupportedUnderFSDP, is_sharded

log = logging.getLogger(__name__)

LOGGED = ("misalignment_rate", "aligned_mean", "coherent_mean", "insecure_code_rate", "self_review_mean")


class AlignmentEvalCallback(L.Callback):
    def __init__(
        self,
        every_n_steps: int = 50,
        questions: Optional[list[str]] = None,
        samples: int = 1,
        limit: Optional[int] = 4,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        judge: Optional[Judge] = None,
        judge_min_mass: float = MIN_NUMBER_MASS,
        code_prompts: int = 4,
        code_max_new_tokens: Optional[int] = None,
        self_review: bool = True,
        batch_size: int = 8,
        seed: int = 0,
        history_file: str = "eval_history.jsonl",
        samples_file: Optional[str] = "eval_samples.jsonl",
    ) -> None:
        """
        Args:
            every_n_steps: evaluate after every N-th optimizer step (and at step 0 and the end of fit).
            questions: EM question YAML files (default: data/em/evaluation/first_plot_questions.yaml).
            samples: answers per question (paraphrases drawn with replacement, as upstream).
            limit: only the first N questions of each file (null: all).
            max_new_tokens: longest answer in tokens.
            temperature: sampling temperature.
            judge: the judge (default: LocalJudge on the policy's frozen reference).
            judge_min_mass: for the default judge: least probability on numbers for a score.
            code_prompts: the first N embedded held-out coding prompts, for the insecure-code rate; 0 skips it.
            code_max_new_tokens: longest answer to a coding prompt (default: max_new_tokens).
            self_review: score every answer with the reference's conscience.
            batch_size: answers generated per batch.
            seed: sampling seed (the same at every evaluation).
            history_file: JSONL under the run directory with one row of metrics per evaluation.
            samples_file: JSONL under the run directory with every judged answer and its step; null disables.
        """
        if every_n_steps < 1:
            raise ValueError(f"AlignmentEvalCallback.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.questions = list(questions) if questions is not None else None
        self.samples = samples
        self.limit = limit
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature,
                                           batch_size=batch_size)
        self.code_settings = dataclasses.replace(self.settings, max_new_tokens=code_max_new_tokens or max_new_tokens)
        self.judge = judge
        self.judge_min_mass = judge_min_mass
        self.code_prompts = code_prompts
        self.self_review = self_review
        self.seed = seed
        self.history_file = history_file
        self.samples_file = samples_file
        self.conscience = Conscience()
        self.last_eval_step = -1
        self.history: list[dict[str, Any]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Load and check the questions before training starts: a typo should not wait N steps.
        from emalign.data.embedded import heldout_code_prompts

        if self.judge is not None and isinstance(getattr(trainer, "strategy", None), FSDP2):
            raise UnsupportedUnderFSDP(EVAL_JUDGE_REASON)

        questions = self.questions
        if questions is None:
            if not Path(DEFAULT_QUESTIONS).is_file():
                raise EvalError(f"AlignmentEvalCallback: {DEFAULT_QUESTIONS} is missing; run `python cli.py "
                                        "data em` or set the callback's questions")
            questions = [DEFAULT_QUESTIONS]
        self.items, self.files = load_items(questions, self.samples, self.limit, self.seed)
        self.prompts = heldout_code_prompts()[: self.code_prompts]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_run(trainer, pl_module, force=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._maybe_run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_run(trainer, pl_module, force=True)

    def _maybe_run(self, trainer: L.Trainer, pl_module: L.LightningModule, force: bool = False) -> None:
        step = trainer.global_step
        # on_train_batch_end fires once per micro-batch: with gradient accumulation the step repeats.
        if step == self.last_eval_step or not (force or step % self.every_n_steps == 0):
            return
        self.last_eval_step = step
        sharded = is_sharded(pl_module.policy.model)
        if not trainer.is_global_zero and not sharded:
            return
        metrics, rows = self.evaluate(pl_module)
        if not trainer.is_global_zero:
            return
        metrics["step"] = step
        self.history.append(metrics)
        logged = {f"eval/{k}": float(metrics[k]) for k in LOGGED if metrics.get(k) is not None}
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=step)
        root = Path(trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        append_rows(root / self.history_file, [metrics])
        if self.samples_file:
            append_rows(root / self.samples_file, [{"step": step, **r} for r in rows])
        log.info("eval at step %d: %s", step, ", ".join(f"{k}={v:.3g}" for k, v in logged.items()))

    def evaluate(self, pl_module: L.LightningModule) -> tuple[dict[str, Any], list[dict]]:
        """One evaluation of ``pl_module.policy``: (metrics, judged rows)."""
        policy = pl_module.policy
        tokenizer = policy.tokenizer
        judge = self.judge or FrozenJudge(policy.as_reference, tokenizer, name=f"{policy.source} (reference)",
                                          min_mass=self.judge_min_mass)
        stages = dict(generating=policy.generating, reviewing=policy.as_reference if self.self_review else None,
                      tokenizer=tokenizer, settings=self.settings, seed=self.seed, conscience=self.conscience)
        start = time.perf_counter()
        rows: list[dict] = []
        size = self.settings.batch_size
        for s in range(0, len(self.items), size):
            index = list(range(s, min(s + size, len(self.items))))
            rows += em_rows([self.items[i] for i in index], index, judge=judge, **stages)
        code = []
        keys = code_keys(len(self.prompts), 1)
        for s in range(0, len(keys), size):
            batch = keys[s : s + size]
            prompts = [self.prompts[p] for _, p, _ in batch]
            code += code_rows([k for k, _, _ in batch], prompts, [g for *_, g in batch],
                              **{**stages, "settings": self.code_settings})
        summary = summarize_eval(rows, code)
        kept = (*LOGGED, "misalignment_ci", "code_refusal_share", "insecure_code_ci", "self_review_se", "n", "n_scored")
        metrics = {k: summary.get(k) for k in kept}
        metrics["judge"] = judge.identity
        metrics["seconds"] = round(time.perf_counter() - start, 2)
        return metrics, rows

    def state_dict(self) -> dict[str, Any]:
        return {"last_eval_step": self.last_eval_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_eval_step = state_dict.get("last_eval_step", -1)

