"""EmergentAlignment: the training system (a LightningModule) for fine-tuning with a conscience.

    loss = task loss (SFT on assistant tokens) + align_weight * preference loss (queued pairs)

The policy and its frozen reference live in ``Policy``; pairs arrive in ``pair_queue`` from the
``ConscienceCallback`` with their reference log-probs already computed, so a training step needs
no reference forward. Chosen and rejected go through the policy in one concatenated forward.
Checkpoints hold only what trains (adapter weights, the snapshot adapter) plus the pair queue.

Supports: LoRA, QLoRA (4-bit NF4 base), full fine-tuning; DDP and FSDP strategies; pure-conscience
runs without task data. Not supported: pipeline parallelism, multiple-adapter training, packing.
"""

from __future__ import annotations

import inspect
import logging
import math
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from emalign.conscience import Pair
from emalign.logprobs import mean_token_nll, pad_right, response_mask, sequence_logps
from emalign.losses import PreferenceLoss, SigmoidDPO
from emalign.models import LoRA, Policy
from emalign.queue import PairQueue

log = logging.getLogger(__name__)


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """Linear warmup then cosine decay to ``min_ratio`` of the peak, over ``total_steps``."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 10, total_steps: int = 1000, min_ratio: float = 0.1) -> None:
        def factor(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / (warmup_steps + 1)
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        super().__init__(optimizer, factor)


class NonFiniteLossError(RuntimeError):
    pass


class EmergentAlignment(L.LightningModule):
    def __init__(
        self,
        policy: Optional[Policy] = None,
        preference_loss: Optional[PreferenceLoss] = None,
        pair_queue: Optional[PairQueue] = None,
        align_weight: float = 1.0,
        pairs_per_step: int = 4,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: Optional[LRSchedulerCallable] = WarmupCosine,
        adapter_dir: str = "adapter",
        max_nonfinite_in_a_row: int = 5,
    ) -> None:
        """
        Args:
            policy: the model, its adapter and the reference kind (default: ``Policy()``, embedded SmolLM2 + LoRA).
            preference_loss: the alignment term's loss on queued pairs (default: ``SigmoidDPO()``).
            pair_queue: where the conscience leaves pairs (default: ``PairQueue()``).
            align_weight: lambda in ``task + lambda * preference``.
            pairs_per_step: pairs drawn from the queue for each training step.
            optimizer: built over the trainable parameters.
            scheduler: stepped every optimizer step; ``total_steps`` defaults to the fit's length.
            adapter_dir: where the trained adapter goes at the end of fit, under ``trainer.default_root_dir``.
            max_nonfinite_in_a_row: a non-finite loss skips the update; this many in a row stop the fit.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["policy", "preference_loss", "pair_queue"])
        # Built here, not as default arguments: a default instance would be shared by every module.
        self.policy = policy if policy is not None else Policy(adapter=LoRA())
        self.preference_loss = preference_loss if preference_loss is not None else SigmoidDPO()
        self.pair_queue = pair_queue if pair_queue is not None else PairQueue()
        self.align_weight = align_weight
        self.pairs_per_step = pairs_per_step
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.adapter_dir = adapter_dir
        self.max_nonfinite_in_a_row = max_nonfinite_in_a_row
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0
        self.strict_loading = False  # checkpoints hold only what trains

    @property
    def tokenizer(self):
        return self.policy.tokenizer

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.policy(input_ids, attention_mask)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Optional[torch.Tensor]:
        terms = []
        if batch:
            task = mean_token_nll(self.policy.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            self.log("task/loss", task, prog_bar=True, batch_size=batch["input_ids"].shape[0])
            terms.append(task)
        pairs = self.pair_queue.sample(self.pairs_per_step, self.global_step)
        if pairs:
            align = self.alignment_loss(pairs)
            terms.append(self.align_weight * align)
        if not terms:
            return None  # pure-conscience run before the first pairs: nothing to learn from yet
        loss = torch.stack(terms).sum()
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)
        if not torch.isfinite(loss):
            return self._skip_nonfinite(loss)
        self.nonfinite_in_a_row = 0
        self.log("train/loss", loss, prog_bar=True, batch_size=1)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = mean_token_nll(self.policy.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = self.optimizer(params)
        if self.scheduler is None:
            return optimizer
        kwargs = {}
        if "total_steps" in inspect.signature(self.scheduler).parameters and self.trainer is not None:
            bound = getattr(self.scheduler, "keywords", {})  # a partial from the CLI keeps explicit settings
            if "total_steps" not in bound:
                kwargs["total_steps"] = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler(optimizer, **kwargs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def alignment_loss(self, pairs: list[Pair]) -> torch.Tensor:
        """Preference loss on queued pairs: chosen and rejected in one concatenated policy forward."""
        prompts = [p.prompt_ids for p in pairs] * 2
        responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
        ids, mask = pad_right([a + b for a, b in zip(prompts, responses)], self.tokenizer.pad_token_id, self.device)
        target = response_mask([len(p) for p in prompts], [len(r) for r in responses], ids.shape[1], self.device)
        logps = sequence_logps(self.policy.model, ids, mask, target)
        pi_chosen, pi_rejected = logps.chunk(2)
        ref_chosen = torch.tensor([p.ref_chosen for p in pairs], device=self.device)
        ref_rejected = torch.tensor([p.ref_rejected for p in pairs], device=self.device)
        losses, chosen_rewards, rejected_rewards = self.preference_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected)
        n = len(pairs)
        self.log("align/loss", losses.mean(), prog_bar=False, batch_size=n)
        self.log("align/reward_margin", (chosen_rewards - rejected_rewards).mean(), batch_size=n)
        self.log("align/reward_accuracy", (chosen_rewards > rejected_rewards).float().mean(), batch_size=n)
        return losses.mean()

    def _skip_nonfinite(self, loss: torch.Tensor) -> None:
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        log.warning("non-finite loss %s at step %d: update skipped (%d in a row)", loss.item(), self.global_step, self.nonfinite_in_a_row)
        if self.nonfinite_in_a_row >= self.max_nonfinite_in_a_row:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} non-finite losses in a row at step {self.global_step}; "
                "stopping (the last checkpoint holds the last good state). Lower the learning rate or check the data."
            )
        return None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {f"policy.{k}" for k in self.policy.trainable_state_dict()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["pair_queue"] = self.pair_queue.state_dict()
        checkpoint["emalign"] = {"skipped_steps": self.skipped_steps, "base_model": self.policy.source}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "pair_queue" in checkpoint:
            self.pair_queue.load_state_dict(checkpoint["pair_queue"])
        self.skipped_steps = checkpoint.get("emalign", {}).get("skipped_steps", 0)

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero and not self.trainer.interrupted:
            out = self.policy.save_pretrained(Path(self.trainer.default_root_dir) / self.adapter_dir)
            print(f"adapter saved to {out.resolve()}", flush=True)
