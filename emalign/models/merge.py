"""Decoding through LoRA layers merged into plain linears, out of place.

While decoding, a LoRA layer runs three matrix products (base, A, B) and an add on a few rows per call;
the two small products are per-call overhead, not arithmetic. ``merged_adapter``
swaps every LoRA layer for one ``nn.Linear`` holding ``W + scale * B A`` and puts the LoRA layers
back on exit. The merge is computed into a new tensor: peft's in-place ``merge_adapter`` followed by
``unmerge_adapter`` does not give back the same floats, and the base weights are also the frozen
reference. A layer whose adapter is off (the reference generating) is swapped for its base layer,
with no copy. Layers that are not a plain sum (a 4-bit base, DoRA) and sharded models decode as they are.

The cost is a copy of the adapted weights while generation runs (about 0.4 GB for SmolLM2 with
adapters on every projection). The gain is faster decoding with the same tokens (measured in
bench/README.md, "Answered probes: sampling weights").
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)


def _merged(name: str, layer) -> nn.Module | None:
    """One linear equal to the LoRA layer's eval-mode forward (its base layer when no adapter is live);
    ``None`` where the adapter is not a plain sum on a plain linear (4-bit base, DoRA, embedding)."""
    from peft.tuners.lora import Linear as LoraLinear

    base = layer.base_layer
    live = [] if layer.disable_adapters or layer.merged else [a for a in layer.active_adapters if a in layer.lora_A]
    if not live:
        return base
    if not isinstance(layer, LoraLinear) or type(base) is not nn.Linear or any(layer.use_dora.get(a) for a in live):
        _warn_once(f"generation.merge_lora: {name} ({type(layer).__name__} over {type(base).__name__}) cannot be "
                   "merged into a plain linear; it decodes as it is")
        return None
    # On the meta device: no memory and no random initialisation for weights replaced right below.
    merged = nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
    weight = base.weight
    for adapter in live:
        weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
    merged.weight = nn.Parameter(weight, requires_grad=False)
    merged.bias = base.bias  # shared, not copied: LoRA adds nothing to it
    return merged


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def swap_modules(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put each module in place under its dotted name; returns what was there (to swap back)."""
    previous = {}
    for name, module in modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        previous[name] = getattr(parent, child)
        setattr(parent, child, module)
    return previous


@contextmanager
def merged_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with each LoRA layer replaced by its merged linear; the LoRA layers back on exit.

    For generation only (eval mode: adapter dropout is not applied). Layers that cannot be merged, and
    a sharded model, stay as they are (a warning once): the tokens are the same either way."""
    from peft.tuners.lora import LoraLayer  # here: importing peft takes seconds

    from emalign.models.sharding import is_sharded  # sharding imports Lightning, which inference does not need

    if is_sharded(model):  # the weights are shards (DTensor): each rank holds part of every matrix
        _warn_once("generation.merge_lora: a sharded (FSDP) model decodes through its LoRA layers as they are")
        yield model
        return
    with torch.no_grad():
        merged = {name: _merged(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    merged = {name: m for name, m in merged.items() if m is not None}
    originals = swap_modules(model, merged)
    try:
        yield model
    finally:
        swap_modules(model, originals)
