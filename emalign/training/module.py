"""EmergentAlignment: the training system (a LightningModule) for fine-tuning with a conscience.

    loss = task loss (SFT on assistant tokens) + align_weight * preference loss (queued pairs)

The policy and its frozen reference live in ``Policy``; pairs arrive in ``pair_queue`` from the
``ConscienceCallback`` with their reference log-probs already computed, so a training step needs
no reference forward. Each pair goes through the policy as one row, prompt + chosen + rejected, the
prompt shared (``emalign.models.logprobs.pair_logps``).
Checkpoints hold only what trains (adapter weights, the snapshot adapter) plus the pair queue and
the global RNG states, so a resumed fit continues exactly. A non-finite loss or gradient skips the
update on every rank (see docs/reliability.md).

Supports: LoRA, QLoRA (4-bit NF4 base), full fine-tuning; DDP and FSDP strategies; pure-conscience
runs without task data. Not supported: pipeline parallelism, multiple-adapter training, packing of
the task data.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import random
import uuid
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from emalign.errors import SettingError, UserError, check_range
from emalign.fence.lightning import attached_trainer
from emalign.models.logprobs import mean_token_nll, pair_logps, sequence_logps
from emalign.models.policy import LoRA, Policy
from emalign.models.sharding import any_rank, shard_policy
from emalign.records import Pair
from emalign.training.checkpoint import AdapterExistsError, adapter_conflict, save_checkpoint_now, write_fit_record
from emalign.training.losses import PreferenceLoss, SigmoidDPO
from emalign.training.model_card import write_model_card
from emalign.training.pair_queue import PairQueue

log = logging.getLogger(__name__)


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """Linear warmup then cosine decay to ``min_ratio`` of the peak, over ``total_steps``."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, warmup_steps: int = 10, total_steps: int = 1000, min_ratio: float = 0.1
    ) -> None:
        check_range("model.scheduler.warmup_steps", warmup_steps, 0)
        check_range("model.scheduler.total_steps", total_steps, 1)
        check_range("model.scheduler.min_ratio", min_ratio, 0, 1)

        def factor(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / (warmup_steps + 1)
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        super().__init__(optimizer, factor)


def collect_rng_states() -> dict[str, Any]:
    """The global RNG states (torch CPU and CUDA, numpy, python ``random``) as plain types and tensors.

    Plain, because Lightning loads checkpoints with ``weights_only=True``, which refuses numpy arrays.
    """
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
    }
    if torch.cuda.is_available():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(states["torch"])
    cuda = states.get("torch.cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = states["python"]
    random.setstate((version, tuple(state), gauss_next))


class NonFiniteLossError(UserError, RuntimeError):
    """Too many non-finite losses in a row: the fit stops (``cli.py`` prints it as one ``error:`` line)."""


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
        checkpoint_pairs: bool = False,
        overwrite_adapter: bool = False,
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
            checkpoint_pairs: recompute the pairs' decoder layers during backward instead of keeping their
                activations (``Policy.checkpointed``). Off by default: on the demo it cost a 1.6x slower pair
                step to save 9% of the peak (bench/README.md, "defaults cost"); a policy with
                ``gradient_checkpointing`` checkpoints every layer already.
            overwrite_adapter: let this fit replace a model that another fit saved in ``adapter_dir`` (without
                it, such a fit stops before training, in one line naming both; resuming the same fit is allowed).
        """
        super().__init__()
        check_range("model.align_weight", align_weight, 0)
        check_range("model.pairs_per_step", pairs_per_step, 0)
        check_range("model.max_nonfinite_in_a_row", max_nonfinite_in_a_row, 1)
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
        self.checkpoint_pairs = checkpoint_pairs
        self.overwrite_adapter = overwrite_adapter
        self.run_id: Optional[str] = None  # this fit's identity, kept in its checkpoints and beside its adapter
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0
        self._nonfinite_loss = False  # a non-finite loss since the last optimizer step
        self._empty_step = False  # a DDP micro-batch with neither task data nor pairs (zero loss)
        self._had_terms = False  # a micro-batch with something to learn since the last optimizer step
        self._rng_to_restore: Optional[dict[str, Any]] = None
        # Why the fit was asked to stop early (e.g. "SIGTERM", set by StopOnSignal): no export at its end then.
        self.stop_requested: Optional[str] = None
        self.strict_loading = False  # checkpoints hold only what trains

    @property
    def tokenizer(self):
        return self.policy.tokenizer

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.policy(input_ids, attention_mask)

    def configure_model(self) -> None:
        # Only Lightning's ModelParallelStrategy (emalign.models.sharding.FSDP2) sets a device mesh.
        if self.device_mesh is not None:
            shard_policy(self.policy, self.device_mesh["data_parallel"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Optional[torch.Tensor]:
        terms = []
        if batch:
            task = mean_token_nll(self.policy.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            self.log("task/loss", task, prog_bar=True, batch_size=batch["input_ids"].shape[0])
            terms.append(task)
        pairs = self.pair_queue.sample(self.pairs_per_step, self.global_step, draw=batch_idx)
        # Under FSDP every forward is collective: a rank without pairs joins the others' pair forward.
        peers_have_pairs = self.device_mesh is not None and any_rank(bool(pairs), self.device)
        if pairs:
            align = self.alignment_loss(pairs)
            terms.append(self.align_weight * align)
        elif peers_have_pairs:
            terms.append(self._zero_forward())
        if not terms:  # pure-conscience run before the first pairs: nothing to learn from yet
            if attached_trainer(self) is None or self.trainer.world_size == 1:
                return None  # Lightning skips the step
            # DDP refuses None (every rank must run backward): a zero loss on every trainable
            # parameter instead, and on_before_optimizer_step drops the update if all ranks had none.
            self._empty_step = True
            return torch.stack([(p * 0).sum() for p in self.policy.parameters() if p.requires_grad]).sum()
        self._had_terms = True
        loss = torch.stack(terms).sum()
        if torch.isfinite(loss):
            self.log("train/loss", loss, prog_bar=True, batch_size=1)
        else:
            # Still returned: backward must run on every rank (DDP all-reduces inside it); the update
            # is dropped in on_before_optimizer_step, where all ranks decide together.
            self._nonfinite_loss = True
            log.warning("non-finite loss %s at step %d", loss.item(), self.global_step)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._task_loss(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._task_loss(batch, "test")

    def _task_loss(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        loss = mean_token_nll(self.policy.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        try:
            optimizer = self.optimizer(params)
        except ValueError as err:  # torch checks lr, betas, eps, weight decay: say which key holds them
            raise SettingError(f"model.optimizer: {err}") from None
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
        """Preference loss on queued pairs: chosen and rejected in one policy forward, sharing their prompt."""
        chosen, rejected = [p.chosen_ids for p in pairs], [p.rejected_ids for p in pairs]
        with self.policy.checkpointed() if self.checkpoint_pairs else contextlib.nullcontext():
            pi_chosen, pi_rejected = pair_logps(
                self.policy.model, [p.prompt_ids for p in pairs], chosen, rejected, self.tokenizer.pad_token_id,
                self.device,
            )
        ref_chosen = torch.tensor([p.ref_chosen for p in pairs], device=self.device)
        ref_rejected = torch.tensor([p.ref_rejected for p in pairs], device=self.device)
        if self.preference_loss.length_normalized:  # per-token averages (TRL's IPO), the reference's too
            n_chosen, n_rejected = torch.tensor([len(r) for r in chosen + rejected], device=self.device).chunk(2)
            pi_chosen, ref_chosen = pi_chosen / n_chosen, ref_chosen / n_chosen
            pi_rejected, ref_rejected = pi_rejected / n_rejected, ref_rejected / n_rejected
        losses, chosen_rewards, rejected_rewards = self.preference_loss(
            pi_chosen, pi_rejected, ref_chosen, ref_rejected
        )
        n = len(pairs)
        self.log("align/loss", losses.mean(), prog_bar=False, batch_size=n)
        self.log("align/reward_margin", (chosen_rewards - rejected_rewards).mean(), batch_size=n)
        self.log("align/reward_accuracy", (chosen_rewards > rejected_rewards).float().mean(), batch_size=n)
        return losses.mean()

    def _zero_forward(self) -> torch.Tensor:
        """One policy forward like ``alignment_loss``'s (decoder and head, same checkpointing) adding nothing."""
        ids = torch.full((1, 2), self.tokenizer.pad_token_id, device=self.device)
        target = torch.tensor([[False, True]], device=self.device)
        with self.policy.checkpointed() if self.checkpoint_pairs else contextlib.nullcontext():
            return 0.0 * sequence_logps(self.policy.model, ids, torch.ones_like(ids), target).sum()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip the update when the loss or any gradient is non-finite (on any rank).

        Gradients become ``None`` rather than zero: the optimizer then leaves those parameters and
        their state (Adam moments, step count, weight decay) exactly as they were. The step still
        counts (global step, scheduler), so ``max_steps`` bounds the run whatever happens.
        """
        empty = self._empty_step and not self._had_terms  # every micro-batch of the step was empty
        self._empty_step = self._had_terms = False
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms = torch.stack([g.detach().float().norm() for g in grads]) if grads else None
        bad = self._nonfinite_loss or (norms is not None and not bool(torch.isfinite(norms).all()))
        self._nonfinite_loss = False
        if attached_trainer(self) is not None:  # one collective, on every rank: (ranks with a bad loss, with terms)
            flags = torch.tensor([float(bad), float(not empty)], device=self.device)
            flags = self.trainer.strategy.reduce(flags, reduce_op="sum")
            bad, empty = bool(flags[0] > 0), bool(flags[1] == 0)
        if empty:  # no rank had anything to learn: leave the weights and optimizer state be
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            return
        if not bad:
            self.nonfinite_in_a_row = 0
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        log.warning("non-finite loss or gradients at step %d: update skipped (%d in a row)", self.global_step,
                    self.nonfinite_in_a_row)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)
        if self.nonfinite_in_a_row < self.max_nonfinite_in_a_row:
            return
        # The skipped updates left the weights as they were after the last finite step.
        path = save_checkpoint_now(self.trainer)
        raise NonFiniteLossError(
            f"{self.nonfinite_in_a_row} non-finite losses in a row (steps {self.global_step - self.nonfinite_in_a_row}"
            f" to {self.global_step - 1}); fit stopped. The weights of the last finite step are in {path}."
            " Lower the learning rate or check the data, then resume with --ckpt_path"
        )

    def on_train_start(self) -> None:
        self.stop_requested = None
        if self._rng_to_restore is not None:
            # Restored here, not in on_load_checkpoint: the sanity check and the loaders' set-up run in
            # between, and the run must continue from exactly the state the checkpoint was taken in.
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {f"policy.{k}" for k in self.policy.trainable_state_dict()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["pair_queue"] = self.pair_queue.state_dict()
        checkpoint["emalign"] = {
            "skipped_steps": self.skipped_steps,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "base_model": self.policy.source,
            "run_id": self.run_id,
            "adapter": repr(self.policy.adapter) if self.policy.adapter is not None else None,
        }
        checkpoint["rng_states"] = collect_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_same_adapter(checkpoint)
        if "pair_queue" in checkpoint:
            self.pair_queue.load_state_dict(checkpoint["pair_queue"])
        state = checkpoint.get("emalign", {})
        self.skipped_steps = state.get("skipped_steps", 0)
        self.run_id = state.get("run_id", self.run_id)
        streak = state.get("nonfinite_in_a_row", 0)
        # A checkpoint written by the non-finite stop itself gives the resumed fit a fresh allowance.
        self.nonfinite_in_a_row = streak if streak < self.max_nonfinite_in_a_row else 0
        self._rng_to_restore = checkpoint.get("rng_states")

    def _check_same_adapter(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, in one line, a checkpoint whose trainable weights this policy does not have (another LoRA
        rank or target modules): Lightning would fail deep in load_state_dict or the optimizer's groups."""
        saved = {k.removeprefix("policy."): tuple(v.shape) for k, v in checkpoint.get("state_dict", {}).items()}
        here = {k: tuple(v.shape) for k, v in self.policy.trainable_state_dict().items()}
        if not saved or saved == here:
            return
        missing, extra = sorted(set(here) - set(saved)), sorted(set(saved) - set(here))
        shapes = sorted(k for k in set(saved) & set(here) if saved[k] != here[k])
        what = (f"{shapes[0]} is {list(saved[shapes[0]])} there, {list(here[shapes[0]])} here" if shapes
                else f"{len(extra)} of its weights are not in this model, e.g. {extra[0]}" if extra
                else f"{len(missing)} of this model's trainable weights are not in it, e.g. {missing[0]}")
        recorded = (checkpoint.get("emalign") or {}).get("adapter")
        raise UserError(f"the checkpoint was written with another adapter ({what}"
                        f"{f'; it was made with {recorded}' if recorded else ''}): resume with the settings it was "
                        "made with (model.policy.adapter), or start anew in another --trainer.default_root_dir")

    def on_fit_start(self) -> None:
        # Restored from the checkpoint when resuming (on_load_checkpoint runs first); rank 0's id for all ranks.
        self.run_id = self.trainer.strategy.broadcast(self.run_id or uuid.uuid4().hex[:12])
        out = Path(self.trainer.default_root_dir) / self.adapter_dir
        refusal = adapter_conflict(out, self.run_id, self.overwrite_adapter) if self.trainer.is_global_zero else None
        refusal = self.trainer.strategy.broadcast(refusal)
        if refusal:
            raise AdapterExistsError(refusal)

    def on_fit_end(self) -> None:
        if not self.trainer.interrupted and self.stop_requested is None:
            # Every rank takes part: under FSDP the weights are gathered from all shards.
            out = Path(self.trainer.default_root_dir) / self.adapter_dir
            self.policy.save_pretrained(out, write=self.trainer.is_global_zero)
            if self.trainer.is_global_zero:
                write_fit_record(out, self.run_id, self.global_step)
                write_model_card(out, self.trainer, self.policy)
                print(f"adapter saved to {out.resolve()} (model card: README.md)", flush=True)
