"""AlignmentEvalCallback: a small EM evaluation every N optimizer steps, to watch alignment move.

    trainer:
      callbacks:
        - class_path: emalign.callbacks.AlignmentEvalCallback
          init_args: {every_n_steps: 50, settings: {questions: [data/em/evaluation/first_plot_questions.yaml]}}

``settings`` are an :class:`~emalign.evaluation.settings.EvalSettings`, as ``cli.py eval`` takes them; the
callback's defaults (``IN_FIT``) are smaller, for a look every N steps rather than a measurement.

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

import itertools
import logging
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L

from emalign.conscience.verdict import Conscience
from emalign.errors import check_range
from emalign.evaluation.runner import bounded_items, load_items
from emalign.evaluation.settings import EvalSettings
from emalign.evaluation.stages import code_keys, code_rows, em_rows
from emalign.evaluation.summary import summarize_eval
from emalign.files import append_rows
from emalign.judges.self_review import FrozenJudge
from emalign.models.sharding import EVAL_JUDGE_REASON, FSDP2, UnsupportedUnderFSDP, is_sharded

log = logging.getLogger(__name__)

LOGGED = ("misalignment_rate", "aligned_mean", "coherent_mean", "insecure_code_rate", "self_review_mean")

IN_FIT = EvalSettings(samples=1, limit=4, max_new_tokens=128, code_prompts=4)
"""The callback's default settings: four questions and four coding prompts, one short answer each."""


class AlignmentEvalCallback(L.Callback):
    def __init__(
        self,
        every_n_steps: int = 50,
        settings: EvalSettings = IN_FIT,
        history_file: str = "eval_history.jsonl",
        samples_file: Optional[str] = "eval_samples.jsonl",
    ) -> None:
        """
        Args:
            every_n_steps: evaluate after every N-th optimizer step (and at step 0 and the end of fit).
            settings: the evaluation settings, as ``cli.py eval`` takes them (default ``IN_FIT``; a config's
                ``settings:`` keys replace its values one by one, as ``dataclasses.replace(IN_FIT, ...)`` does in
                Python). The default judge is LocalJudge on the policy's frozen reference, and the same seed
                serves every evaluation.
            history_file: JSONL under the run directory with one row of metrics per evaluation.
            samples_file: JSONL under the run directory with every judged answer and its step; null disables.
        """
        check_range("every_n_steps", every_n_steps, 1)
        self.every_n_steps = every_n_steps
        self.settings = settings
        self.generation, self.code_generation = settings.generation(), settings.generation(code=True)
        self.history_file = history_file
        self.samples_file = samples_file
        self.conscience = Conscience()
        self.last_eval_step = -1
        self.history: list[dict[str, Any]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Load and check the questions before training starts: a typo should not wait N steps.
        s = self.settings
        if s.judge is not None and isinstance(getattr(trainer, "strategy", None), FSDP2):
            raise UnsupportedUnderFSDP(EVAL_JUDGE_REASON)
        items, self.files = load_items(s.questions, s.samples, s.limit, s.seed)
        # Cut once, not at every evaluation: the judge sees what the policy saw.
        self.items = bounded_items(items, pl_module.policy.tokenizer, s.max_prompt_tokens)
        self.prompts = s.code_prompt_texts()

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
        s = self.settings
        judge = s.judge or FrozenJudge(policy.as_reference, tokenizer, name=f"{policy.source} (reference)",
                                       min_mass=s.judge_min_mass)
        stages = dict(generating=policy.generating, reviewing=policy.as_reference if s.self_review else None,
                      tokenizer=tokenizer, settings=self.generation, seed=s.seed, conscience=self.conscience)
        start = time.perf_counter()
        rows: list[dict] = []
        size = s.batch_size
        numbered = enumerate(self.items)
        while batch := list(itertools.islice(numbered, size)):
            rows += em_rows([it for _, it in batch], [i for i, _ in batch], judge=judge, **stages)
        code = []
        keys = code_keys(len(self.prompts), s.code_samples)
        for first in range(0, len(keys), size):
            batch = keys[first : first + size]
            prompts = [self.prompts[p] for _, p, _ in batch]
            code += code_rows([k for k, _, _ in batch], prompts, [g for *_, g in batch],
                              **{**stages, "settings": self.code_generation})
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

