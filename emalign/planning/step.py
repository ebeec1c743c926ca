"""One steady-state step of a fit, phase by phase, through the project's own code, with its memory counted.

    shapes = Shapes(task_rows=2, task_tokens=2048, accumulate=8, prompts=8, prompt_tokens=1024, new_tokens=256,
                    pairs=4)
    memory = run_step(module, conscience_step, shapes, precision="bf16-mixed")
    memory.phases["train: task + pairs"].peak

The phases, in the order a fit meets them once its optimizer has state:
1. ``conscience: sampling``: one generation call at its largest (``generation.batch_size`` rows, prompts at
   ``max_prompt_tokens``, ``max_new_tokens`` decoded), as ``sample_ids`` runs it: each prompt's prefill shared
   by its samples, then one token at a time over the growing KV cache, each step's logits through the seeded
   sampler. It is emulated because ``generate`` stops on data (end of turn) and meta tensors hold none: every
   row decodes to the bound, the worst case.
2. ``conscience: review``: ``Conscience.review`` itself, by the frozen reference, over every rollout.
3. ``conscience: revision`` (with ``revise_below``): the reference rewriting, as sampling.
4. ``train: task``: ``EmergentAlignment.training_step`` on a task micro-batch at ``max_length``, and backward.
5. ``train: task + pairs``: the same with ``pairs_per_step`` queued pairs (the DPO term in the same backward);
   ``train: pairs`` in a fit without task data (``data.train_file: null``), which has no phase 4.
6. ``optimizer step``: clipping and the optimizer's update.
With gradient accumulation, gradients stay alive between micro-batches, so phase 5 runs with phase 4's.
"""

from __future__ import annotations

import contextlib
import types
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from emalign.conscience.step import ConscienceStep
from emalign.fence.dispatch import engine_backward
from emalign.models.merge import merged_adapter
from emalign.models.sampling import SeededSampler
from emalign.planning.cuda import AttentionKernel, EmulatedAutocast
from emalign.planning.tracker import LiveMemory
from emalign.records import Pair
from emalign.training.module import EmergentAlignment

PRECISIONS = {"32-true": None, "32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
"""The trainer precisions a plan runs (the low precision of autocast; None: none)."""

TOKEN = 100
"""The made-up token every planned sequence holds: memory depends on lengths, not on which tokens."""


@dataclass(frozen=True)
class Shapes:
    """The sizes one planned step runs at: the largest the fit's settings allow."""

    task_rows: int
    """Sequences in a task micro-batch (``data.batch_size``; 0: the fit has no task data)."""
    task_tokens: int
    """Their length (``data.max_length``)."""
    accumulate: int
    """Micro-batches per optimizer step (``trainer.accumulate_grad_batches``)."""
    prompts: int = 0
    """Prompts per conscience run (``conscience.num_prompts``; 0: no conscience)."""
    prompt_tokens: int = 0
    """Prompt length (``generation.max_prompt_tokens``)."""
    new_tokens: int = 0
    """Answer length (``generation.max_new_tokens``)."""
    pairs: int = 0
    """Pairs per training step (``model.pairs_per_step``)."""


def run_step(module: EmergentAlignment, conscience: Optional[ConscienceStep], shapes: Shapes,
             precision: str = "32-true", clip: Optional[float] = None, target: str = "cuda") -> LiveMemory:
    """Run the phases (module docstring) on ``module``'s device, on meta or for real, counting memory. On meta,
    attention runs as on ``target`` ("cuda", or "cpu" to check a plan against a real CPU run)."""
    policy = module.policy
    vocab = policy.model.get_output_embeddings().weight.shape[0]
    memory = LiveMemory(vocab, cuda=policy.device.type == "cuda")
    trainable = [p for p in policy.parameters() if p.requires_grad]
    memory.track_module(policy)
    memory.watch_gradients(trainable)
    kernels = AttentionKernel(target) if policy.device.type == "meta" else contextlib.nullcontext()
    with memory, kernels, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer, deprecations: the plan shows its table only
        optimizer = module.optimizer(trainable)
        _first_update(optimizer, trainable, memory)
        if conscience is not None and shapes.prompts:
            _conscience(policy, conscience, shapes, memory)
        batch = _task_batch(shapes, policy.device) if shapes.task_rows else {}  # {}: a fit without task data
        if batch:
            with memory.phase("train: task"):
                _train(module, batch, precision)
            if shapes.accumulate == 1:
                optimizer.zero_grad(set_to_none=True)
        if conscience is not None and shapes.pairs:
            module.pair_queue.put(_pairs(shapes), step=0)
            with memory.phase("train: task + pairs" if batch else "train: pairs"):
                _train(module, batch, precision)
        with memory.phase("optimizer step", default_kind="optimizer temporaries"):
            if clip:
                torch.nn.utils.clip_grad_norm_(trainable, clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return memory


def _first_update(optimizer: torch.optim.Optimizer, trainable: list, memory: LiveMemory) -> None:
    """One update on zero gradients, so that the optimizer's state exists as it does after a fit's first step."""
    for param in trainable:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    memory.retag([t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)],
                 "optimizer state")


def _conscience(policy, conscience: ConscienceStep, shapes: Shapes, memory: LiveMemory) -> None:
    settings = conscience.generation
    samples = conscience.samples_per_prompt
    rows = max(settings.batch_size, samples)
    per_call = min(shapes.prompts, max(1, rows // samples))  # as sample_ids splits the prompts
    with memory.phase("conscience: sampling"), policy.generating() as model:
        with merged_adapter(model) if settings.merge_lora else contextlib.nullcontext():
            decode(model, per_call, samples, shapes, settings, memory)
    prompt = [TOKEN] * shapes.prompt_tokens
    answers = [[TOKEN] * shapes.new_tokens for _ in range(shapes.prompts * samples)]
    with memory.phase("conscience: review"), policy.as_reference() as reference:
        conscience.conscience.review(reference, policy.tokenizer, [prompt] * len(answers), answers)
    if conscience.conscience.revise_below is not None:
        with memory.phase("conscience: revision"), policy.as_reference() as reference:
            decode(reference, min(shapes.prompts, settings.batch_size), 1, shapes, settings, memory)


@torch.no_grad()
def decode(model, prompts: int, samples: int, shapes: Shapes, settings, memory: LiveMemory) -> None:
    """``prompts x samples`` rows decoded to ``max_new_tokens`` as ``sample_ids`` does (module docstring)."""
    device = next(model.parameters()).device
    ids = torch.full((prompts, shapes.prompt_tokens), TOKEN, device=device)
    with _cache_kept_as_cache(model, memory) as held:
        shared = samples > 1 and settings.share_prefill
        if shared:  # the prefill of every prompt token but the last, once per prompt, its cache copied per sample
            out = model(input_ids=ids[:, :-1], attention_mask=torch.ones_like(ids[:, :-1]), use_cache=True,
                        logits_to_keep=1)
            held.cache = out.cache
            del out
            with memory.counting_as("kv cache"):  # the copies being made are the cache
                held.cache.batch_repeat_interleave(samples)
        ids = ids.repeat_interleave(samples, 0)
        rows = ids.shape[0]
        sampler = SeededSampler([0] * rows, settings.temperature, settings.top_p, device) if settings.temperature \
            else None
        step_ids = ids[:, -1:] if shared else ids
        for _ in range(shapes.new_tokens):
            out = model(input_ids=step_ids, cache=held.cache, use_cache=True, logits_to_keep=1,
                        attention_mask=torch.ones(rows, ids.shape[1], device=device, dtype=torch.long))
            held.cache = out.cache
            logits = out.logits[:, -1, :].to(copy=True, dtype=torch.float32)  # as generate copies them
            del out
            scores = sampler(ids, logits) if sampler else logits
            step_ids = scores.argmax(-1, keepdim=True)
            ids = torch.cat([ids, step_ids], 1)


@contextlib.contextmanager
def _cache_kept_as_cache(model, memory: LiveMemory):
    """Count the KV cache as the cache from the moment each decoder layer extends it: a layer's new keys and
    values replace its old ones inside its forward, so a retag after the whole step would miss them at the
    step's peak. Yields a holder whose ``cache`` the decoding sets."""
    from transformers.modeling_layers import GradientCheckpointingLayer  # what every decoder layer is

    held = types.SimpleNamespace(cache=None)

    def retag(*_):
        if held.cache is not None and held.cache.layers:
            memory.retag([t for layer in held.cache.layers for t in (layer.keys, layer.values)
                          if isinstance(t, torch.Tensor)], "kv cache")

    hooks = [m.register_forward_hook(retag) for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    try:
        yield held
    finally:
        for hook in hooks:
            hook.remove()


def _task_batch(shapes: Shapes, device) -> dict[str, torch.Tensor]:
    ids = torch.full((shapes.task_rows, shapes.task_tokens), TOKEN, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _pairs(shapes: Shapes) -> list[Pair]:
    prompt, answer = [TOKEN] * shapes.prompt_tokens, [TOKEN] * shapes.new_tokens
    return [Pair(prompt, answer, list(answer), 0.0, 0.0, 1.0, -1.0, step=0) for _ in range(shapes.pairs)]


def _train(module: EmergentAlignment, batch: dict[str, torch.Tensor], precision: str) -> None:
    """A micro-batch as Lightning runs it: the forward under the precision's autocast, then backward."""
    low, device = PRECISIONS[precision], module.policy.device.type
    if low is not None and device == "meta":
        # Kept on through backward: a checkpointed block's recomputation must run under the autocast of its
        # forward (torch's checkpoint re-enters the real one, not a function mode). Backward's own formulas are
        # C++, out of a function mode's reach as they are out of autocast's.
        with EmulatedAutocast(low):
            engine_backward(module.training_step(batch, 0))
        return
    with contextlib.nullcontext() if low is None else torch.autocast(device, dtype=low):
        loss = module.training_step(batch, 0)
    loss.backward()
