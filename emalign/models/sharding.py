"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) for a ``Policy``.

    trainer:
      strategy: {class_path: emalign.models.sharding.FSDP2}   # any device count, any number of nodes

``FSDP2`` is Lightning's ``ModelParallelStrategy`` with data parallelism only: every rank holds a
shard of every weight and gathers a layer's weights just before the layer runs. It runs on CPU
(gloo) as well as on GPUs (nccl); Lightning's FSDP1 ``FSDPStrategy`` refuses CPU and PyTorch
develops FSDP2 in its place.

Sharding units: each decoder layer, and the decoder together with the output head (the head may
share its weight with the embedding). The unit boundaries are exactly the modules that
``emalign.models.logprobs`` and ``generate`` call directly, so no code path meets a sharded weight.
PEFT's ``disable_adapter`` only flips flags on the LoRA layers, so the reference (adapter off)
works unchanged on sharded weights (tests/test_fsdp.py asserts it equals the base model).

Every forward under FSDP is collective: all ranks must run the same number of them. Generation
keeps stepping until every rank has finished (``synced_gpus``); the training step runs a
zero-weight forward on a rank without pairs when another rank has some (``any_rank``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Optional

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from emalign.errors import UserError
from emalign.fence.models import decoder_layer_classes


class UnsupportedUnderFSDP(UserError):
    """A feature combined with FSDP that cannot work there; raised before any weights load."""


class FSDP2(ModelParallelStrategy):
    """``ModelParallelStrategy`` with all devices of all nodes in one data-parallel (sharding) group.

    ``save_distributed_checkpoint`` defaults to False: the checkpoint holds only trainable weights
    (small under LoRA), gathered on rank 0 into one ``last.ckpt`` like DDP's.
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = False,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
    ) -> None:
        """
        Args:
            save_distributed_checkpoint: one file per rank instead of one gathered file (not tested here).
            process_group_backend: ``gloo``, ``nccl``, ... (default: the device's).
            timeout: how long a collective may wait for the other ranks.
        """
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, timeout=timeout,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend)

    def setup_environment(self) -> None:
        # "auto" would mean one data-parallel group per node with tensor parallelism inside it.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def shard_policy(policy: nn.Module, mesh) -> None:
    """Apply ``fully_shard`` to the policy's model (and a full fine-tune's frozen reference copy)."""
    if getattr(policy, "quantized", False):
        raise UnsupportedUnderFSDP(QLORA_REASON)
    _shard_causal_lm(policy.model, mesh)
    if getattr(policy, "_reference_copy", None) is not None:
        _shard_causal_lm(policy._reference_copy, mesh)


def _shard_causal_lm(model: nn.Module, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_types = decoder_layer_classes(lm)
    layers = [m for m in lm.modules() if type(m).__name__ in layer_types]
    if not layers:
        raise UnsupportedUnderFSDP(f"FSDP: {type(lm).__name__} names no decoder layer class (_no_split_modules)")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    # The decoder and the head in one unit (they may share the embedding weight), because
    # emalign.models.logprobs calls each of them directly; the causal LM around them is the root, with no
    # weights of its own. FSDP takes as root the first unit to run forward, so one forward through the
    # causal LM settles that before anything calls the decoder alone.
    fully_shard([lm.get_decoder(), lm.get_output_embeddings()], mesh=mesh)
    fully_shard(lm, mesh=mesh)
    device = next(lm.parameters()).device
    with torch.no_grad():
        lm(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on any rank (collective: every rank must call it)."""
    value = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def max_over_ranks(n: int, device: torch.device) -> int:
    value = torch.tensor([n], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return int(value.item())


QLORA_REASON = ("QLoRA (model.policy.init_args.quantization) cannot be combined with FSDP: 4-bit bitsandbytes "
                "weights do not shard (Lightning #20855, bnb #970); use DDP or set quantization: null")
EVAL_JUDGE_REASON = ("AlignmentEvalCallback with an external judge is not supported under FSDP: every rank would "
                     "call the judge; use the default judge (the frozen reference) or DDP")
REASONING_REASON = ("ConscienceCallback with conscience.include_reasoning: false is not supported under FSDP: the "
                    "extra reference pass for stripped reasoning differs between ranks; use DDP")


FSDP1_REASON = ("Lightning's FSDPStrategy (FSDP1) is not supported: it refuses CPU, and PEFT's disabled-adapter "
                "reference breaks under it (peft #1442); use strategy: emalign.models.sharding.FSDP2")


def check_config(strategy: Any, quantization: Any, callbacks: Optional[list] = None) -> None:
    """Refuse what FSDP cannot do, from the parsed config (plain values), before any model is built."""
    name = strategy if isinstance(strategy, str) else _class_and_args(strategy)[0] or type(strategy).__name__
    if name in ("fsdp", "fsdp_cpu_offload") or name.endswith("FSDPStrategy"):
        raise UnsupportedUnderFSDP(FSDP1_REASON)
    if not name.endswith(("FSDP2", "ModelParallelStrategy")):
        return
    if quantization:
        raise UnsupportedUnderFSDP(QLORA_REASON)
    for callback in callbacks or []:
        path, init = _class_and_args(callback)
        if path.endswith("AlignmentEvalCallback") and (init.get("settings") or {}).get("judge"):
            raise UnsupportedUnderFSDP(EVAL_JUDGE_REASON)
        if path.endswith("ConscienceCallback") and init.get("conscience"):
            if _class_and_args(init["conscience"])[1].get("include_reasoning") is False:
                raise UnsupportedUnderFSDP(REASONING_REASON)


def _class_and_args(value: Any) -> tuple[str, dict]:
    """(class_path, init_args) of a config value: a dict, a jsonargparse Namespace, or an instance."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return str(value.get("class_path", "")), dict(value.get("init_args") or {})
    return type(value).__module__ + "." + type(value).__name__, {}
