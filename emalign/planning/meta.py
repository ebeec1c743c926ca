"""A policy at its real shape on the meta device: built from ``config.json`` alone, no weights read or allocated.

``MetaPolicy`` is :class:`~emalign.models.policy.Policy` with another loader: the same adapter, reference,
gradient checkpointing and QLoRA preparation (peft's own) run on tensors that have shapes and dtypes only.
4-bit layers are bitsandbytes' own ``Linear4bit``, quantised on meta by bitsandbytes' ``quantize_4bit`` (its
fake kernel gives the packed weights' and constants' sizes), so their forward and backward are bitsandbytes'
code too. The architecture comes from, in order: ``model_config`` (a ``config.json``), the model directory or
cached Hub copy, or the config shipped with emalign for the models the configs name (``SHIPPED``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from emalign.errors import UserError
from emalign.models.policy import DType, LoRA, Policy, Quantization, ReferenceKind, load_tokenizer
from emalign.models.sources import ModelSourceError

log = logging.getLogger(__name__)

SHIPPED = Path(__file__).resolve().parent.parent / "resources" / "model_configs"
"""``<org>--<name>.json``: the architectures of the Hub models emalign's configs name."""


def model_config(source: str, config_file: Optional[str] = None, trust_remote_code: bool = False):
    """The transformers config of ``source``: from ``config_file``, the source itself, or ``SHIPPED``."""
    from transformers import AutoConfig

    shipped = SHIPPED / f"{source.replace('/', '--')}.json"
    if config_file is None and shipped.is_file():
        config_file = str(shipped)
    if config_file is not None:
        try:
            values = json.loads(Path(config_file).read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"--model_config {config_file}: not a readable config.json ({err})") from None
        values = {k: v for k, v in values.items() if k != "_comment"}
        if "model_type" not in values:
            raise UserError(f"--model_config {config_file}: it has no model_type (a transformers config.json has)")
        return AutoConfig.for_model(**values)
    try:
        from emalign.models.sources import from_hub

        return from_hub(AutoConfig.from_pretrained, source, trust_remote_code=trust_remote_code)
    except (ModelSourceError, OSError, ValueError) as err:
        first = str(err).strip().partition("\n")[0]
        raise UserError(f"no config.json for model {source!r} ({first}): pass one with --model_config FILE") from None


def stand_in_tokenizer(source: str, trust_remote_code: bool, chat_template: Optional[str]):
    """The model's own tokenizer where it is on this machine, else the embedded SmolLM2's (nothing is downloaded):
    the plan's token ids are made up to the lengths it plans for, so a tokenizer serves for its pad id and chat
    template only."""
    if _on_this_machine(source):
        try:
            return load_tokenizer(source, trust_remote_code, chat_template)
        except (UserError, OSError, ValueError):
            pass
    log.info("plan: no tokenizer for %s on this machine; the embedded SmolLM2's stands in (ids only)", source)
    return load_tokenizer("smollm2-135m-instruct")


def _on_this_machine(source: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    from emalign.models.sources import EMBEDDED_MODELS

    if source in EMBEDDED_MODELS or source.endswith(".gguf") or Path(source).expanduser().is_dir():
        return True
    try:
        return isinstance(try_to_load_from_cache(source, "tokenizer_config.json"), str)
    except ValueError:  # not a Hub id
        return False


def quantize_on_meta(lm: nn.Module, quantization: Quantization) -> None:
    """Replace ``lm``'s linear layers as transformers' bitsandbytes loader does (its own function, the same
    layers kept in high precision), and quantise each weight on meta with bitsandbytes' ``quantize_4bit``."""
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import get_keys_to_not_convert

    config = quantization.to_bnb()
    replace_with_bnb_linear(lm, get_keys_to_not_convert(lm), config)
    dtype = config.bnb_4bit_compute_dtype
    for module in lm.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            full = torch.empty(module.out_features, module.in_features, dtype=dtype, device="meta")
            packed, state = bnb.functional.quantize_4bit(
                full, quant_type=quantization.quant_type, compress_statistics=quantization.double_quant,
                quant_storage=config.bnb_4bit_quant_storage)
            module.weight = bnb.nn.Params4bit(
                packed, requires_grad=False, quant_state=state, compress_statistics=quantization.double_quant,
                quant_type=quantization.quant_type, quant_storage=config.bnb_4bit_quant_storage, module=module,
                bnb_quantized=True)
    lm.is_loaded_in_4bit = True  # what peft's prepare_model_for_kbit_training reads


class MetaPolicy(Policy):
    """A :class:`Policy` on the meta device (same arguments, plus ``model_config``): shapes and dtypes, no data."""

    def __init__(self, model: str = "smollm2-135m-instruct", adapter: Optional[LoRA] = None,
                 quantization: Optional[Quantization] = None, reference: ReferenceKind = "base",
                 dtype: DType = "float32", gradient_checkpointing: bool = False, trust_remote_code: bool = False,
                 chat_template: Optional[str] = None, model_config: Optional[str] = None) -> None:
        self._config_file = model_config
        super().__init__(model, adapter, quantization, reference, dtype, gradient_checkpointing, trust_remote_code,
                         chat_template)

    def _load(self, model: str, dtype: DType, quantization: Optional[Quantization], trust_remote_code: bool,
              chat_template: Optional[str]) -> tuple[object, nn.Module]:
        from transformers import AutoModelForCausalLM

        config = model_config(model, self._config_file, trust_remote_code)
        tokenizer = stand_in_tokenizer(model, trust_remote_code, chat_template)
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype),
                                                  trust_remote_code=trust_remote_code)
        if quantization is not None:
            quantize_on_meta(lm, quantization)
        return tokenizer, lm


def materialize(policy: Policy, device: str) -> None:
    """Give a meta policy uninitialised storage on ``device``, the 4-bit constants too: random weights of the real
    shape, for running the planned step for real on a GPU (their values do not change the memory)."""
    quantized = {m: own["weight"] for m in policy.modules() for own in [dict(m.named_parameters(recurse=False))]
                 if getattr(own.get("weight"), "quant_state", None) is not None}
    policy.to_empty(device=device)  # a 4-bit weight comes back a plain parameter: made 4-bit again below
    lm = policy.model.get_base_model() if hasattr(policy.model, "get_base_model") else policy.model
    lm.tie_weights()  # to_empty gives each of tied weights' names its own storage
    if quantized:
        import bitsandbytes as bnb
    for module, old in quantized.items():
        _empty_like_on(old.quant_state, device)
        module.weight = bnb.nn.Params4bit(
            module.weight.data, requires_grad=False, quant_state=old.quant_state, blocksize=old.blocksize,
            compress_statistics=old.compress_statistics, quant_type=old.quant_type, quant_storage=old.quant_storage,
            module=module, bnb_quantized=True)


def _empty_like_on(state, device: str) -> None:
    """A bitsandbytes ``QuantState``'s tensors (and its nested state's) made uninitialised on ``device``."""
    for name, value in vars(state).items():
        if isinstance(value, torch.Tensor):
            setattr(state, name, torch.empty_like(value, device=device))
        elif type(value).__name__ == "QuantState":
            _empty_like_on(value, device)
