"""ConscienceCallback: every N steps the policy samples, its frozen copy reviews, pairs are queued.

    trainer:
      callbacks:
        - class_path: callbacks.ConscienceCallback
          init_args: {every_n_steps: 4, num_prompts: 4, samples_per_prompt: 2}

Runs before the training step of every N-th optimizer step, so the pairs it makes are trained on
in that same step. Under DDP each rank draws its own prompts (the seed includes the rank).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

from callbacks.tables import log_rollout_table
from emalign.conscience import Conscience, PairBuilder
from emalign.prompts import PromptSource, TrainingPrompts
from emalign.sampling import GenerationSettings, render_prompt, sample_ids
from emalign.sharding import is_sharded, max_over_ranks


def run_id(trainer: L.Trainer) -> str:
    """This fit's id: the logger's version (``version_3``, the folder of its metrics), else the start time."""
    version = trainer.logger.version if trainer.logger is not None else None
    if version is None:
        return time.strftime("%Y%m%dT%H%M%S")
    return f"version_{version}" if isinstance(version, int) else str(version)


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
        seed: int = 0,
        rollouts_file: Optional[str] = "rollouts.jsonl",
    ) -> None:
        """
        Args:
            every_n_steps: run the conscience before every N-th optimizer step (step 0 included).
            num_prompts: prompts drawn per run (M).
            samples_per_prompt: answers sampled per prompt (K >= 2 to form pairs).
            prompts: where prompts come from (default: ``TrainingPrompts()``, the fit's own user turns).
            conscience: the introspective question and its scoring (default: ``Conscience()``).
            pair_builder: how scored rollouts become pairs (default: ``PairBuilder()``).
            generation: sampling settings for rollouts (default: ``GenerationSettings()``).
            seed: base seed; each sample's seed derives from (seed, rank, step, prompt, sample).
            rollouts_file: JSONL under the run directory with every rollout, its score and whether it
                was chosen or rejected; ``null`` disables it. Fits into the same directory append to it,
                each row tagged with its fit's ``run`` (the logger's version, ``version_N``, as in
                ``logs/version_N/metrics.csv``).
        """
        if samples_per_prompt < 2:
            raise ValueError("ConscienceCallback.samples_per_prompt must be >= 2 to build pairs")
        self.every_n_steps = every_n_steps
        self.num_prompts = num_prompts
        self.samples_per_prompt = samples_per_prompt
        self.prompts = prompts if prompts is not None else TrainingPrompts()
        self.conscience = conscience if conscience is not None else Conscience()
        self.pair_builder = pair_builder if pair_builder is not None else PairBuilder()
        self.generation = generation if generation is not None else GenerationSettings()
        self.seed = seed
        self.rollouts_file = rollouts_file
        self.last_run_step = -1
        self.run_id = ""
        self.stats: dict[str, float] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.prompts.bind(trainer)
        self.run_id = run_id(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or step == self.last_run_step:
            return
        self.last_run_step = step
        self.stats = self.run(pl_module, step, trainer.global_rank)
        self.stats["queue_size"] = float(len(pl_module.pair_queue))
        if trainer.is_global_zero:
            rows = self._rollout_rows()
            if self.rollouts_file:
                self._write_rollouts(Path(trainer.default_root_dir) / self.rollouts_file, rows)
            log_rollout_table(trainer, step, rows)
        self._log(trainer, pl_module, step)

    def run(self, pl_module, step: int, rank: int = 0) -> dict[str, float]:
        """One conscience step: sample, review, pair, enqueue. Returns its statistics."""
        policy, tokenizer = pl_module.policy, pl_module.policy.tokenizer
        seed = self.seed * 1009 + rank
        drawn = self.prompts.draw(self.num_prompts, step, seed)
        conversations = [c for _, c in drawn]
        prompt_ids = [render_prompt(tokenizer, c, self.generation.max_prompt_tokens) for c in conversations]
        start = time.perf_counter()
        with policy.generating() as model:
            rollouts = sample_ids(model, tokenizer, prompt_ids, self.generation, self.samples_per_prompt, seed, step)
        gen_seconds = time.perf_counter() - start
        gen_tokens = sum(len(r.response_ids) for r in rollouts)
        with policy.as_reference() as reference:
            review = self.conscience.review(reference, tokenizer, [r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts])
            revised = self._revise(reference, tokenizer, conversations, rollouts, review, seed, step)
        pairs = self.pair_builder.build(rollouts, review, step)
        enqueued = pl_module.pair_queue.put(pairs, step)
        self._last = {"step": step, "rollouts": rollouts, "review": review, "pairs": pairs, "conversations": conversations}
        return {
            "score_mean": float(review.scores.mean()),
            "approval_rate": float((review.scores > 0).float().mean()),
            "pairs_enqueued": float(enqueued),
            "gen_tokens_per_s": gen_tokens / gen_seconds if gen_seconds else 0.0,
            "revisions_kept": float(revised),
        }

    def _revise(self, reference, tokenizer, conversations, rollouts, review, seed: int, step: int) -> int:
        """Self-correction: replace a prompt's best rollout by the frozen model's revision when it scores higher."""
        threshold = self.conscience.revise_below
        if threshold is None:
            return 0
        best: dict[int, int] = {}
        for i, r in enumerate(rollouts):
            if r.prompt_index not in best or review.scores[i] > review.scores[best[r.prompt_index]]:
                best[r.prompt_index] = i
        low = [i for i in best.values() if review.scores[i] < threshold]
        wanted = set(low)
        if is_sharded(reference):  # revising is collective under FSDP: all ranks revise as many as the busiest
            extra = max_over_ranks(len(low), next(reference.parameters()).device) - len(low)
            low += [i for i in best.values() if i not in wanted][:extra]
        if not low:
            return 0
        conv = [conversations[rollouts[i].prompt_index] for i in low]
        revisions = self.conscience.revise(reference, tokenizer, conv, [rollouts[i].text for i in low], self.generation, seed, step)
        checked = self.conscience.review(reference, tokenizer, [r.prompt_ids for r in revisions], [r.response_ids for r in revisions])
        kept = 0
        for n, (i, revision) in enumerate(zip(low, revisions)):
            if i in wanted and checked.scores[n] > review.scores[i]:
                revision.prompt_index, revision.sample_index = rollouts[i].prompt_index, rollouts[i].sample_index
                revision.revised = True
                rollouts[i] = revision
                review.scores[i], review.ref_logps[i] = checked.scores[n], checked.ref_logps[n]
                kept += 1
        return kept

    def _log(self, trainer: L.Trainer, pl_module, step: int) -> None:
        """The run's statistics at the step it ran, only then (not repeated on the steps between runs)."""
        for logger in trainer.loggers:  # straight to the loggers: log_every_n_steps must not drop a run
            logger.log_metrics({f"conscience/{name}": value for name, value in self.stats.items()}, step=step)
        for name in ("approval_rate", "queue_size"):
            pl_module.log(f"conscience/{name}", self.stats[name], prog_bar=True, logger=False, batch_size=1)

    def _rollout_rows(self) -> list[dict[str, Any]]:
        last = self._last
        chosen = {(tuple(p.prompt_ids), tuple(p.chosen_ids)) for p in last["pairs"]}
        rejected = {(tuple(p.prompt_ids), tuple(p.rejected_ids)) for p in last["pairs"]}
        rows = []
        for i, r in enumerate(last["rollouts"]):
            key = (tuple(r.prompt_ids), tuple(r.response_ids))
            rows.append({
                "run": self.run_id,
                "step": last["step"],
                "prompt": last["conversations"][r.prompt_index][-1]["content"],
                "response": r.text,
                "score": round(float(last["review"].scores[i]), 4),
                "role": "chosen" if key in chosen else "rejected" if key in rejected else "unpaired",
                "revised": r.revised,
            })
        return rows

    @staticmethod
    def _write_rollouts(path: Path, rows: list[dict[str, Any]]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def state_dict(self) -> dict[str, Any]:
        return {"last_run_step": self.last_run_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_run_step = state_dict.get("last_run_step", -1)
