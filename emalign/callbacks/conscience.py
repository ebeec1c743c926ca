"""ConscienceCallback: every N steps run the conscience step (emalign.conscience.step) and queue its pairs.
In a config it has a section of its own, ``conscience: {every_n_steps: 4}`` (``--conscience null``: off).

It only schedules, logs and writes ``rollouts.jsonl``. It runs before the training step of every
N-th optimizer step, so its pairs are trained on in that same step. Under DDP each rank draws its
own prompts (the seed includes the rank).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L

from emalign.callbacks.tables import log_rollout_table, run_id
from emalign.conscience.prompts import PromptSource, TrainingPrompts
from emalign.conscience.step import ConscienceStep
from emalign.conscience.verdict import Conscience, PairBuilder
from emalign.errors import check_range
from emalign.files import append_rows
from emalign.models.sampling import GenerationSettings
from emalign.seeds import fit_seed, mix_seed


class ConscienceCallback(L.Callback):
    def __init__(
        self,
        every_n_steps: int = 4,
        num_prompts: int = 4,
        samples_per_prompt: int = 2,
        prompts: Optional[PromptSource] = None,
        conscience: Optional[Conscience] = None,
        pair_builder: Optional[PairBuilder] = None,
        generation: Optional[GenerationSettings] = None,
        seed: Optional[int] = None,
        rollouts_file: Optional[str] = "rollouts.jsonl",
    ) -> None:
        """
        Args:
            every_n_steps: run the conscience before every N-th optimizer step (step 0 included).
            num_prompts: prompts drawn per run (M).
            samples_per_prompt: answers sampled per prompt (K >= 2 to form pairs).
            prompts: where prompts come from (default: ``TrainingPrompts()``, the fit's own user turns).
            conscience: the introspective question, its scoring and revision (default: ``Conscience()``).
            pair_builder: how scored rollouts become pairs (default: ``PairBuilder()``).
            generation: sampling settings for rollouts (default: ``GenerationSettings()``).
            seed: base seed (``None``: ``seed_everything``'s); with rank, step, prompt and sample it seeds each sample.
            rollouts_file: JSONL under the run directory: each rollout, its score, its role in the pairs,
                tagged with its fit's ``run`` (the logger's ``version_N``); ``null`` disables it.
        """
        check_range("ConscienceCallback.every_n_steps", every_n_steps, 1)
        check_range("ConscienceCallback.num_prompts", num_prompts, 1)
        self.every_n_steps, self.num_prompts, self.samples_per_prompt = every_n_steps, num_prompts, samples_per_prompt
        self.prompts = prompts if prompts is not None else TrainingPrompts()
        self.conscience = conscience if conscience is not None else Conscience()
        self.pair_builder = pair_builder if pair_builder is not None else PairBuilder()
        self.generation = generation if generation is not None else GenerationSettings()
        self.seed, self.rollouts_file = seed, rollouts_file  # the step checks samples_per_prompt
        self.runner = ConscienceStep(self.conscience, self.pair_builder, self.generation, samples_per_prompt)
        self.last_run_step, self.run_id, self.stats, self.last = -1, "", {}, None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.runner.check_prompt_room(pl_module.tokenizer)
        self.prompts.bind(trainer)
        self.run_id = run_id(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or step == self.last_run_step:
            return
        self.last_run_step = step
        self.stats = self.run(pl_module, step, trainer.global_rank)
        if trainer.is_global_zero:
            rows = self.last.rows(self.run_id)
            if self.rollouts_file:
                append_rows(Path(trainer.default_root_dir) / self.rollouts_file, rows)
            log_rollout_table(trainer, step, rows)
        for logger in trainer.loggers:  # straight to the loggers at the run's step: log_every_n_steps must not drop it
            logger.log_metrics({f"conscience/{name}": value for name, value in self.stats.items()}, step=step)
        for name in ("approval_rate", "queue_size"):
            pl_module.log(f"conscience/{name}", self.stats[name], prog_bar=True, logger=False, batch_size=1)

    def run(self, pl_module, step: int, rank: int = 0) -> dict[str, float]:
        """One conscience step on ``pl_module.policy``; its pairs go to ``pl_module.pair_queue``. Returns statistics."""
        seed = mix_seed(fit_seed(self.seed), rank, multiplier=1009)
        prompts = [conversation for _, conversation in self.prompts.draw(self.num_prompts, step, seed)]
        self.last = self.runner.step(pl_module.policy, prompts, step, seed)
        stats = self.last.stats()
        stats["pairs_enqueued"] = float(pl_module.pair_queue.put(self.last.pairs, step))
        stats["queue_size"] = float(len(pl_module.pair_queue))
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {"last_run_step": self.last_run_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_run_step = state_dict.get("last_run_step", -1)
